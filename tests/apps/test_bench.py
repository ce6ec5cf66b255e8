"""Tests of the benchmark command (its numbers are not asserted: timing belongs to the command)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from droppath import Residual
from droppath.apps.bench import (
    BenchConfig,
    MaskMultiplyResidual,
    PlainResidual,
    format_table,
    run_bench,
)
from droppath.apps.cli import main


@pytest.mark.parametrize("kind", ["mlp", "attn", "conv", "vit"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_run_bench_reports_every_variant(kind, mode):
    cfg = BenchConfig(
        kind=kind,
        depth=3,
        batch=8,
        width=16,
        tokens=4,
        p=0.5,
        mode=mode,
        reps=2,
        warmup=1,
        bucket=4,
    )
    report = run_bench(cfg, progress=False)
    names = [r["name"] for r in report["results"]]
    assert names[:2] == ["plain", "mask-multiply"] and "Residual p=0" in names
    if mode == "row":
        assert {"Residual mask", "Residual subset", "Residual auto", "Residual bucket=4"} <= set(
            names
        )
    variants = [r["variant"] for r in report["results"]]
    assert variants[0]["kind"] == "plain" and variants[-1]["p_zero"] is True
    plain = report["results"][0]
    assert plain["ratio"] == 1.0 and len(plain["times_ms"]) == 2
    assert all(r["step_ms"] > 0 for r in report["results"])
    assert report["kept_fraction"] == 0.5
    assert "| plain |" in format_table(report)
    json.dumps(report)
    by_name = {r["name"]: r for r in report["results"]}
    if mode == "row":  # what auto took at each of its sites (or "pending": still measuring)
        choices = by_name["Residual auto"]["auto_choices"]
        assert sum(choices.values()) >= 3 and set(choices) <= {"pending", "subset", "mask"}
        assert by_name["Residual subset"]["auto_choices"] == {}  # pinned: nothing to choose
        assert "auto chose, per site: " in format_table(report)
    else:
        assert all(r["auto_choices"] == {} for r in report["results"])


def test_bench_reports_what_auto_chose():
    cfg = BenchConfig(kind="mlp", depth=2, batch=8, width=16, tokens=4, p=0.5, reps=2, warmup=5)
    report = run_bench(cfg, progress=False)
    choices = {r["name"]: r["auto_choices"] for r in report["results"]}["Residual auto"]
    assert sum(choices.values()) == 2 and set(choices) <= {"subset", "mask"}, choices


def test_subset_saves_activation_memory():
    cfg = BenchConfig(kind="mlp", depth=6, batch=64, width=32, tokens=4, p=0.5, reps=1, warmup=0)
    report = run_bench(cfg, progress=False)
    mem = {r["name"]: r["memory_ratio_to_mask_multiply"] for r in report["results"]}
    assert mem["Residual subset"] < 0.8
    assert mem["Residual mask"] == pytest.approx(1.0, abs=0.05)


def test_mask_multiply_baseline_is_the_timm_formulation():
    block = Residual(nn.Linear(4, 4), 0.5)
    mm = MaskMultiplyResidual(block)
    x = torch.randn(200, 4)
    out = mm(x)
    branch = (out - x).detach()
    full = block.branch(x).detach()
    dropped = (branch == 0).all(1)
    kept = torch.isclose(branch, 2 * full, atol=1e-5).all(1)
    assert (dropped ^ kept).all() and dropped.any() and kept.any()
    assert torch.equal(PlainResidual(block)(x), x + block.branch(x))


def test_cli_json_and_bad_input(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc = main(
        [
            "bench",
            "--depth",
            "2",
            "--batch",
            "4",
            "--width",
            "8",
            "--tokens",
            "2",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--no-progress",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    assert "| Residual auto |" in capsys.readouterr().out
    assert json.loads(path.read_text())["config"]["depth"] == 2
    assert main(["bench", "--kind", "lstm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "droppath bench: error: --kind must be one of 'mlp', 'attn', 'conv', 'vit', 'llama', "
        "got 'lstm'"
    ]
    assert main(["bench", "-p", "1.5"]) == 2
    assert "error: -p must be a probability in [0, 1], got 1.5" in capsys.readouterr().err


def test_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "droppath", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--kind" in out.stdout


def test_compiled_bench_runs_every_variant():
    cfg = BenchConfig(
        kind="mlp", depth=2, batch=8, width=16, tokens=2, reps=1, warmup=2, compile=True
    )
    report = run_bench(cfg, progress=False)
    assert report["config"]["compile"] is True
    assert all(r["step_ms"] > 0 for r in report["results"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "foo"], "--device must be 'cpu' or 'cuda[:N]', got 'foo'"),
        (["--threads", "-1"], "--threads must be an int >= 1, got -1"),
        (
            ["--kind", "attn", "--width", "129"],
            "--width must be a multiple of the 2 attention heads (width // 64) for --kind attn",
        ),
        (  # a folder that cannot be made: under a file
            ["--json", f"{__file__}/dir/out.json"],
            "--json must be a path in a writable folder",
        ),
        (["--bucket", "0"], "--bucket must be None or an int >= 1, got 0"),
        (["--batch", "1000000000"], "--batch must fit the cpu memory: batch 1000000000"),
        (
            ["--model", "keras:resnet"],
            "--model must be LIBRARY:NAME with LIBRARY one of timm, torchvision, transformers, "
            "got 'keras:resnet'",
        ),
        (
            ["--model", "timm:resnet50"],
            "--depth does not apply to a library model (it has its own blocks and rates), got "
            "with --model timm:resnet50",
        ),
        (["--image", "64"], "--image applies to a library model only (--model timm:NAME, ...)"),
        (["--autocast", "fp8"], "--autocast must be one of 'bfloat16', 'float16', got 'fp8'"),
        (
            ["--channels-last"],
            "--channels-last applies to --kind conv or a library model, got --kind mlp",
        ),
        # issue 27, item 10: 0 is refused, not replaced by the default
        (["--batch", "0"], "--batch must be an int >= 1, got 0"),
        (["--tokens", "0"], "--tokens must be an int >= 1, got 0"),
    ],
)
def test_cli_mistakes_are_one_line(args, message, capsys):
    assert main(["bench", "--reps", "1", "--warmup", "0", "--depth", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "--batch must be an int >= 1, got 0"),
        (["--image", "0"], "--image must be an int >= 1, got 0"),
    ],
)
def test_cli_library_model_refuses_zero(args, message, capsys):
    """Issue 27, item 10: ``--batch 0`` and ``--image 0`` are refused, named as flags (the
    library model is not built: the options are checked first)."""
    assert main(["bench", "--model", "timm:resnet50", "--reps", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"droppath bench: error: {message}"]


def test_cli_json_makes_missing_folders_as_train_out_does(tmp_path, capsys):
    """Issue 27, item 11: ``bench --json`` and ``train --out`` both make missing folders."""
    path = tmp_path / "new" / "deeper" / "r.json"
    args = ["--depth", "1", "--batch", "2", "--width", "8", "--tokens", "2", "--reps", "1"]
    assert main(["bench", *args, "--warmup", "0", "--no-progress", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["config"]["depth"] == 1


def test_memory_estimate_admits_the_benchmarked_setups():
    from droppath.apps.bench import estimate_step_bytes

    for kind, batch in (("mlp", 64), ("attn", 64), ("conv", 32), ("vit", 256), ("llama", 16)):
        assert estimate_step_bytes(BenchConfig(kind=kind, batch=batch)) < 4 * 2**30, kind
    measured = run_bench(
        BenchConfig(kind="mlp", depth=4, batch=32, width=64, tokens=8, reps=1, warmup=0),
        progress=False,
    )["results"][0]["memory_mb"]
    estimate = estimate_step_bytes(BenchConfig(kind="mlp", depth=4, batch=32, width=64, tokens=8))
    assert estimate > measured * 2**20  # an upper estimate of what a step keeps


def test_cli_model_needs_its_library(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    assert main(["bench", "--model", "timm:resnet50", "--reps", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model 'timm:resnet50' needs timm: pip install timm" in err[0], err


def test_step_flops_counts_forward_and_backward_and_averages_the_draws():
    from droppath.apps.bench.timing import step_flops

    # a linear layer, input without grad: forward and the weight's gradient, 2 * B * in * out each
    assert step_flops(nn.Linear(4, 3), torch.randn(5, 4), 2) == 2 * (2 * 5 * 4 * 3)
    full = 2 * (2 * 64 * 8 * 8)
    assert step_flops(Residual(nn.Linear(8, 8), p=0.0), torch.randn(64, 8), 1) == full
    assert step_flops(Residual(nn.Linear(8, 8), p=1.0), torch.randn(64, 8), 1) == 0
    torch.manual_seed(0)
    kept = step_flops(Residual(nn.Linear(8, 8), p=0.5), torch.randn(64, 8), 200) / full
    assert abs(kept - 0.5) < 0.02  # 200 steps of 64 rows: the standard error is 0.0044


def test_autocast_and_channels_last_reach_the_step(tmp_path):
    """``--autocast bfloat16 --channels-last``: the convolutions run in bfloat16, on
    channels_last tensors, and the JSON says how the steps ran."""
    seen = []

    def record(module, args, out):
        if isinstance(module, nn.Conv2d):
            seen.append((out.dtype, out.is_contiguous(memory_format=torch.channels_last)))

    path = tmp_path / "r.json"
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        args = ["bench", "--kind", "conv", "--depth", "3", "--batch", "4", "--reps", "1"]
        more = ["--warmup", "0", "--autocast", "bfloat16", "--channels-last", "--no-progress"]
        assert main([*args, *more, "--json", str(path)]) == 0
    finally:
        hook.remove()
    cfg = json.loads(path.read_text())["config"]
    assert cfg["autocast"] == "bfloat16" and cfg["channels_last"] is True
    assert seen and all(dtype == torch.bfloat16 and last for dtype, last in seen), set(seen)


def test_bench_reports_blocks_that_fell_back_to_the_mask(monkeypatch):
    """Issue 27, item 5: a block whose check failed runs every row; the JSON and the table say
    which and why."""
    import droppath.acceleration as acc
    from droppath import accelerate
    from droppath.apps.bench.run import fallbacks

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop_path = nn.Linear(4, 4), nn.Identity()

        def forward(self, x):
            return x + self.drop_path(self.lin(x))

    model = nn.Sequential(Block(), Block())
    accelerate(model, 0.5, rule="uniform")
    monkeypatch.setattr(acc, "verify", lambda *a, **k: "verify: output item 0 differs (planted)")
    with pytest.warns(UserWarning):
        model.train()(torch.randn(8, 4))
    found = fallbacks(model)
    assert found == {"0": "verify: output item 0 differs (planted)", "1": found["1"]}
    cfg = BenchConfig(kind="mlp", depth=2, batch=8, width=16, tokens=4, p=0.5, reps=1, warmup=0)
    report = run_bench(cfg, progress=False)
    assert all(r["fallbacks"] == {} for r in report["results"])
    report["results"][1]["fallbacks"] = found
    assert "fell back to the mask: mask-multiply: 0 (verify: output item 0" in format_table(report)
