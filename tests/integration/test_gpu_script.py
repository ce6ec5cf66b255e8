"""benchmarks/gpu.sh, run on the CPU at tiny sizes (GPU_SH_TINY=1): every command it would run
on a GPU runs here (in one process, compiled ones with the "eager" backend), so the script cannot
rot between the sessions that have a GPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def test_every_command_of_the_gpu_script_runs(tmp_path):
    require("timm")
    env = dict(os.environ, GPU_SH_TINY="1", PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "did not finish" not in done.stdout, done.stdout
    names = re.findall(r"^b ([\w.-]+) \d+ ", SCRIPT.read_text(), flags=re.M)
    assert len(names) >= 10
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in names}
    for name, report in reports.items():
        cfg = report["config"]
        assert report["results"] and all(r["step_ms"] > 0 for r in report["results"]), name
        if cfg["kind"] == "model":  # as people train: bf16 autocast, channels_last convnets
            assert cfg["autocast"] == "bfloat16", name
            assert cfg["channels_last"] == ("convnext" in cfg["model"]), name
            assert 0 < report["kept_work"] <= 1.05, name
        assert cfg["compile"] == name.endswith("-compiled"), name
        assert cfg["compile_backend"] == "eager" or not cfg["compile"], name  # capture only
    rates = {r["config"]["p"] for r in reports.values() if r["config"]["kind"] == "model"}
    assert rates == {0.1, 0.4}
