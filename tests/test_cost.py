"""strategy="auto": the choice between the row subset and the mask from measured costs
(droppath._engine.cost)."""

import time

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from droppath import DropPath, Residual, accelerate
from droppath._engine import AutoChoice, DropSpec, skip_add
from droppath._engine.cost import BACKWARD_FACTOR, TIMED_CALLS, _Measure

N = 64


class Slow(nn.Module):
    """A branch that costs a fixed 3 ms per call whatever its rows: per row, it is expensive."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        time.sleep(0.003)
        return self.lin(x)


class Cheap(nn.Module):
    """A branch that costs next to nothing: the subset's gather and scatter cost more."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def _train(block, steps, shape=(N, 8)):
    for _ in range(steps):
        block(torch.randn(*shape, requires_grad=True)).sum().backward()


def _measured(block, shape=(N, 8)):
    """Run ``block`` until its choice is made (the calls that measure, and one more)."""
    for _ in range(TIMED_CALLS + 3):
        if block.auto_choice != "pending":
            break
        _train(block, 1, shape)
    assert block.auto_choice in ("subset", "mask"), block.auto_choice
    return block


def test_pending_until_measured_then_a_choice():
    block = Residual(Slow(), 0.5)
    assert block.auto_choice == "pending"
    assert "auto=" not in repr(block)  # nothing chosen yet
    _measured(block)
    assert block.auto_choice == "subset"
    assert "strategy='auto', auto='subset'" in repr(block)


def test_expensive_branch_takes_the_subset_cheap_one_the_mask():
    expensive = _measured(Residual(Slow(), 0.5))
    cheap = _measured(Residual(Cheap(), 0.01), shape=(N, 256))
    assert expensive.auto_choice == "subset"
    assert cheap.auto_choice == "mask"
    # the mask choice runs the branch on every sample
    seen = []
    cheap.branch.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    for _ in range(5):
        _train(cheap, 1, (N, 256))
    assert seen and all(n == N for n in seen), seen


def test_the_choice_follows_the_rate():
    block = _measured(Residual(Slow(), 0.5))
    auto = block.spec.auto
    assert auto.saving(0.5) > auto.extra  # why it chose the subset
    # a rate at which the dropped rows' work is worth less than the subset's own cost
    low = 0.5 * auto.extra / auto.saving(1.0)
    block.p = low
    assert block.auto_choice == "mask"
    block.p = 0.5
    assert block.auto_choice == "subset"


def test_choice_is_a_comparison_of_the_two_costs():
    auto = AutoChoice()
    auto.row_time, auto.n, auto.extra = 1e-5, 32, 1e-4
    # saving(p) = p * n * row_time * (1 + backward factor)
    assert auto.saving(0.5) == pytest.approx(0.5 * 32 * 1e-5 * (1 + BACKWARD_FACTOR))
    threshold = 1e-4 / auto.saving(1.0)
    auto.update(threshold * 0.9)
    assert auto.state == "mask"
    auto.update(threshold * 1.1)
    assert auto.state == "subset"


def test_a_noisy_negative_extra_cost_counts_as_none_and_rate_0_takes_the_mask():
    """Two timings of a few microseconds can make the subset's extra cost come out below 0;
    it is read as 0, so a site at rate 0 (nothing to save) takes the mask."""
    auto = AutoChoice()
    auto.calls = 10
    auto.clocks = [(_Done(1e-4), 32)] * 3  # the branch: timed three times
    auto.extra = _Measure([(_Done(1e-6), _Done(2e-6))])  # subset 1 us, mask 2 us
    with torch.enable_grad():
        auto.begin(torch.randn(32, 8, requires_grad=True), 0, 0.0)
    assert auto.extra == 0.0 and auto.state == "mask"
    auto.update(0.1)
    assert auto.state == "subset"


class _Done:
    """A clock that has finished: ``seconds()`` is its interval."""

    def __init__(self, value):
        self.value = value

    def seconds(self):
        return self.value


def test_pinned_strategies_never_measure():
    for strategy in ("subset", "mask"):
        block = Residual(Slow(), 0.5, strategy=strategy)
        _train(block, TIMED_CALLS + 3)
        assert block.auto_choice is None
        assert block.spec.auto.calls == 0
    batch = Residual(Slow(), 0.5, mode="batch")
    _train(batch, 3)
    assert batch.auto_choice is None


def test_deterministic_algorithms_measure_nothing():
    block = Residual(Slow(), 0.5)
    torch.use_deterministic_algorithms(True)
    try:
        _train(block, TIMED_CALLS + 3)
    finally:
        torch.use_deterministic_algorithms(False)
    assert block.auto_choice == "pending" and block.spec.auto.calls == 0


@pytest.mark.parametrize("combine", ["sum", "lerp"])
def test_mask_step_equals_subset_step_under_the_same_draws(combine):
    # the masked step of skip_add draws on the host as the subset does: same kept rows
    from droppath._engine import LERP as _LERP
    from droppath._engine import Sum

    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    x = torch.randn(32, 4, 8, requires_grad=True)
    results = []
    for strategy in ("subset", "mask"):
        spec = DropSpec(0.4, strategy=strategy)
        gen = torch.Generator().manual_seed(3)
        kw = {"combine": Sum() if combine == "sum" else _LERP}
        y = skip_add(x, lambda t: t + branch(t), spec, source=gen, **kw)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        results.append((y, g))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(g1, g0)
    dropped = (y0 == x).all(dim=(1, 2)) if combine == "lerp" else None
    if dropped is not None:  # layer drop: a dropped row is its input, exactly
        assert dropped.any() and not dropped.all()
        assert torch.equal(y1[dropped], x[dropped])


def test_choice_never_changes_in_a_checkpointed_recompute():
    # The choice settles at the start of a forward; the recompute of that forward in backward
    # must take the same path, or checkpointing finds other saved tensors and raises.
    block = Residual(Cheap(), 0.05)
    x = torch.randn(N, 256)
    for _ in range(TIMED_CALLS + 6):
        xi = x.clone().requires_grad_()
        checkpoint(block, xi, use_reentrant=False).sum().backward()
    assert block.auto_choice in ("subset", "mask")  # chosen during checkpointed steps


def test_no_measurement_in_backward_or_without_grad():
    from droppath._engine.cost import _settling

    seen = []
    x = torch.randn(4, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(_settling()))
    y.sum().backward()
    assert seen == [False]
    assert _settling()
    with torch.no_grad():
        assert not _settling()


def test_a_loaded_or_copied_module_measures_again():
    import copy
    import pickle

    block = _measured(Residual(Slow(), 0.5))
    for other in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert other.auto_choice == "pending"
        assert other.state_dict().keys() == block.state_dict().keys()


def test_accelerate_pins_or_reports_the_choice():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp, self.drop_path = Slow(), DropPath(0.5)

        def forward(self, x):
            return x + self.drop_path(self.mlp(x))

    model = nn.Sequential(Block(), Block())
    report = accelerate(model)
    assert [r.auto for r in report] == ["pending", "pending"]
    assert "auto" not in str(report).splitlines()[0]  # no column before a choice
    model.train()
    for _ in range(TIMED_CALLS + 3):
        _train(model, 1)
    report = accelerate(model)  # again: the same settings, and what the sites chose
    assert [r.auto for r in report] == ["subset", "subset"]
    assert str(report).splitlines()[0].split()[:5] == ["site", "block", "rate", "runs", "auto"]
    report = accelerate(model, strategy="mask")
    assert report.counts()["mask"] == 2 and {r.reason for r in report} == {"strategy 'mask'"}
    seen = []
    model[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    _train(model, 3)
    assert seen == [N] * 3  # pinned: every sample, every step
    with pytest.raises(ValueError, match="strategy must be one of"):
        accelerate(model, strategy="fast")


class _Pinned(_Measure):
    """The subset's extra cost, pinned instead of measured."""

    __slots__ = ("value",)

    def __init__(self, value):
        super().__init__([])
        self.value = value

    def seconds(self):
        return self.value


def _pin_costs(monkeypatch, branch_call, extra):
    """Every timed call of a branch takes ``branch_call`` seconds, and the row subset adds
    ``extra`` seconds per call: what ``auto`` chooses then follows from the rate alone, not
    from this machine's speed or load (issue 27, item 10)."""
    import droppath._engine.cost as cost

    monkeypatch.setattr(cost.Clock, "seconds", lambda self: branch_call)
    monkeypatch.setattr(cost, "_extra_cost", lambda x, dim, kept: _Pinned(extra))


def test_compiled_auto_does_not_recompile_when_the_choice_flips(monkeypatch):
    from torch._dynamo.utils import counters

    # a branch call of 1 ms over N rows, an extra 1 ms for the subset: the subset saves
    # p * 1 ms * (1 + BACKWARD_FACTOR), more than it adds from p = 1/3 on
    _pin_costs(monkeypatch, branch_call=1e-3, extra=1e-3)
    torch._dynamo.reset()
    counters.clear()
    model = nn.Sequential(*[Residual(Cheap(), 0.01) for _ in range(3)])
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(N, 256)
    for _ in range(TIMED_CALLS + 3):
        compiled(x.clone().requires_grad_()).sum().backward()
    assert {b.auto_choice for b in model} == {"mask"}
    graphs = counters["stats"]["unique_graphs"]
    for block in model:  # a schedule raises the rates past the threshold
        block.p = 0.5
    assert {b.auto_choice for b in model} == {"subset"}
    for _ in range(3):
        compiled(x.clone().requires_grad_()).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs  # the choice lives on the host
