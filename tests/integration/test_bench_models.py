"""`droppath bench --model`: a real library model, original vs accelerate (the numbers are not
asserted: timing belongs to the command)."""

import json

import pytest

from conftest import require
from droppath.bench import BenchConfig, format_table, run_bench
from droppath.cli import main


@pytest.mark.parametrize(
    "model",
    ["timm:deit_tiny_patch16_224", "torchvision:convnext_tiny", "transformers:dinov2"],
)
def test_model_bench_runs_every_variant(model):
    require(model.split(":")[0])
    cfg = BenchConfig(model=model, image=32, batch=4, p=0.5, reps=1, warmup=0)
    report = run_bench(cfg, progress=False)
    assert [r["name"] for r in report["results"]] == ["original", "accelerate", "accelerate p=0"]
    assert all(r["step_ms"] > 0 for r in report["results"])
    assert 0.5 <= report["kept_fraction"] < 1.0  # the library's rates, up to 0.5
    table = format_table(report)
    assert f"model={model}" in table and "vs original" in table


def test_cli_model_bench_writes_json(tmp_path, capsys):
    require("timm")
    path = tmp_path / "r.json"
    args = ["bench", "--model", "timm:deit_tiny_patch16_224", "--image", "32", "--batch", "4"]
    assert main([*args, "--reps", "1", "--warmup", "0", "--no-progress", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["config"]["model"] == "timm:deit_tiny_patch16_224"
    assert "| accelerate |" in capsys.readouterr().out


def test_unknown_models_are_named(capsys):
    require("timm")
    assert main(["bench", "--model", "timm:no_such_net", "--reps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model must name a timm model, got 'timm:no_such_net'" in err[0]
