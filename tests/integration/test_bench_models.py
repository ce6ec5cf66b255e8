"""`droppath bench --model`: a real library model, original vs accelerate (the numbers are not
asserted: timing belongs to the command)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import require
from droppath.apps.bench import BenchConfig, format_table, run_bench
from droppath.apps.cli import main


@pytest.mark.parametrize(
    "model",
    ["timm:deit_tiny_patch16_224", "torchvision:convnext_tiny", "transformers:dinov2"],
)
def test_model_bench_runs_every_variant(model, tmp_path, capsys):
    require(model.split(":")[0])
    if model.startswith("timm:"):  # through the command line, its JSON read back
        path = tmp_path / "r.json"
        args = ["bench", "--model", model, "--image", "32", "--batch", "4", "-p", "0.5"]
        more = ["--reps", "1", "--warmup", "0", "--no-progress", "--json", str(path)]
        assert main([*args, *more]) == 0
        report = json.loads(path.read_text())
        assert report["config"]["model"] == model
        assert "| accelerate |" in capsys.readouterr().out
    else:
        cfg = BenchConfig(model=model, image=32, batch=4, p=0.5, reps=1, warmup=0)
        report = run_bench(cfg, progress=False)
    assert [r["name"] for r in report["results"]] == ["original", "accelerate", "accelerate p=0"]
    assert all(r["step_ms"] > 0 for r in report["results"])
    assert 0.5 <= report["kept_fraction"] < 1.0  # the library's rates, up to 0.5
    # the FLOPs droppath's step keeps: above the mean keep rate (stem, head and the
    # unskippable work count in full), below the original's
    assert report["kept_fraction"] - 0.1 < report["kept_work"] < 1.0
    table = format_table(report)
    assert f"model={model}" in table and "vs original" in table and "kept work" in table


def test_unknown_models_are_named(capsys):
    require("timm")
    assert main(["bench", "--model", "timm:no_such_net", "--reps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model must name a timm model, got 'timm:no_such_net'" in err[0]


def _convnext_floor():
    """``benchmarks/convnext_floor.py`` as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).parents[2] / "benchmarks" / "convnext_floor.py"
    spec = importlib.util.spec_from_file_location("convnext_floor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_slice_subset_stand_in_is_convnext_itself_when_nothing_drops():
    """The floor of benchmarks/convnext_floor.py skips no work of its own: with every rate 0,
    and in eval, it computes exactly what timm's blocks compute."""
    require("timm")
    floor = _convnext_floor()
    torch.manual_seed(0)
    models = floor.build("convnext_tiny", 0.0)
    x = torch.randn(4, 3, 32, 32)
    for train in (True, False):
        outs = [m.train(train)(x) for m in models.values()]
        assert all(torch.equal(out, outs[0]) for out in outs[1:])
    with pytest.raises(ValueError, match="timm ConvNeXt"):
        floor.slice_subset(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_convnext_floor_script_runs(capsys, monkeypatch):
    require("timm")
    floor = _convnext_floor()
    args = ["--image", "32", "--batch", "4", "--reps", "1", "--warmup", "0", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", ["convnext_floor.py", *args])
    threads = torch.get_num_threads()
    try:
        floor.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for name in ("original", "accelerate", "slice subset", "768 channels, 1x1"):
        assert name in out
