"""Checks that need a CUDA device (skipped without one; benchmarks/gpu.sh runs them on a GPU)."""

import pytest
import torch
from torch import nn

from droppath import DropPath, DropRateScheduler, Residual
from droppath.apps.bench import BenchConfig, run_bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _stack(n=4, **kw):
    return nn.Sequential(
        *[
            Residual(
                nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)),
                0.5,
                **kw,
            )
            for _ in range(n)
        ]
    ).cuda()


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "row", "strategy": "subset"},
        {"mode": "row", "strategy": "auto"},
        {"mode": "row", "strategy": "subset", "bucket": 8},
        {"mode": "row", "strategy": "mask"},
        {"mode": "batch"},
    ],
    ids=["subset", "auto", "bucket", "mask", "batch"],
)
def test_no_host_device_sync(kw):
    model = _stack(**kw)
    x = torch.randn(64, 16, 32, device="cuda", requires_grad=True)
    model(x).sum().backward()  # warm-up: allocations, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            model(x).sum().backward()
            DropPath(0.3)(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_draw_ahead_has_no_host_device_sync():
    """Decisions drawn ahead reach the device by pinned, non-blocking copies: nothing waits."""
    from droppath import draw_ahead

    model = _stack()
    draw_ahead(model)
    x = torch.randn(64, 16, 32, device="cuda", requires_grad=True)
    model(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model[0]._ahead is not None and model[0]._ahead.run.is_cuda
    torch.cuda.synchronize()


def test_subset_rows_match_the_branch_on_cuda():
    block = _stack(1)[0]
    x = torch.randn(256, 32, device="cuda")
    out = block(x)
    full = block.branch(x)
    delta = (out - x).detach()
    dropped = (delta == 0).all(1)
    kept = torch.isclose(delta, 2 * full.detach(), atol=1e-4, rtol=1e-4).all(1)
    assert (dropped | kept).all() and dropped.any() and kept.any()


def test_compiled_schedule_does_not_recompile_on_cuda():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _stack(12)
    sched = DropRateScheduler(model, 0.5, time_rule="warmup", warmup_steps=40)
    compiled = torch.compile(model)
    seen = []
    for _ in range(50):
        compiled(torch.randn(32, 8, 32, device="cuda")).square().mean().backward()
        sched.step()
        seen.append(counters["stats"]["unique_graphs"])
    assert seen[-1] == seen[2], seen


def test_bench_on_cuda():
    cfg = BenchConfig(kind="mlp", depth=2, batch=8, width=32, tokens=4, reps=2, warmup=1)
    report = run_bench(cfg, device="cuda", progress=False)
    assert report["machine"]["gpu"] and all(r["memory_mb"] > 0 for r in report["results"])
