"""``accelerate``'s mechanism on stand-in blocks: the class swap, the report, empty slots, depth
positions by block. The forms of blocks it rewrites are tested in tests/test_derive.py, the real
timm, torchvision and transformers blocks in tests/integration/test_accelerate_real.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from conftest import binom_pvalue
from droppath import DropPath, Residual, accelerate, drop_path_sites, set_drop_rates
from droppath.rates import depth_rates
from droppath.sites import empty_slots, site_positions


class Block(nn.Module):
    """A timm-style pre-norm block with two residuals and empty slots at rate 0."""

    def __init__(self, dim: int = 8, p: float = 0.0, norm: type = nn.LayerNorm):
        super().__init__()
        self.norm1, self.fc1 = norm(dim), nn.Linear(dim, dim)
        self.norm2, self.fc2 = norm(dim), nn.Linear(dim, dim)
        self.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        self.drop_path2 = DropPath(p) if p > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.fc1(self.norm1(x)))
        x = x + self.drop_path2(self.fc2(self.norm2(x)))
        return x


class BNBlock(Block):
    def __init__(self, dim: int = 8, p: float = 0.0):
        super().__init__(dim, p, norm=nn.BatchNorm1d)


class Unknown(Block):
    """Its sites are called from a method that ``forward`` calls by keyword: not inlined, not
    rewritten."""

    def forward(self, x):
        return self._both(x=x)

    def _both(self, x):
        x = x + self.drop_path1(self.fc1(self.norm1(x)))
        return x + self.drop_path2(self.fc2(self.norm2(x)))


@pytest.fixture
def known():
    """Blocks droppath rewrites: any class whose forward calls its sites (no registry)."""


def _model(p=(0.0, 0.1, 0.2, 0.3), block=Block):
    return nn.Sequential(*[block(p=rate) for rate in p])


def test_report_names_weights_and_eval(known):
    torch.manual_seed(0)
    original = _model()
    model = copy.deepcopy(original)
    params = list(model.parameters())
    keys = list(model.state_dict())
    report = accelerate(model, 0.3)
    assert [r.name for r in report] == [f"{i}.drop_path{j}" for i in range(4) for j in (1, 2)]
    assert report.counts() == {"row subset": 8, "batch skip": 0, "mask": 0}
    assert [r.rate for r in report][::2] == pytest.approx(depth_rates(4, 0.3, "linspace"))
    assert "8 sites: 8 row subset, 0 batch skip, 0 mask" in str(report)
    assert repr(report) == "AccelerationReport(8 sites: row subset=8, batch skip=0, mask=0)"
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert type(model[0]).__name__ == "Block" and isinstance(model[0], Block)
    x = torch.randn(16, 8)
    assert torch.equal(model.eval()(x), original.eval()(x))
    model.train()
    original.train()
    set_drop_rates(model, 0.0)
    set_drop_rates(original, 0.0)
    assert torch.equal(model(x), original(x))


def test_branches_see_the_kept_rows_at_rate_one_minus_p(known, monkeypatch):
    import droppath._engine.draws as draws_module

    log = []
    draw = draws_module.draw_rows

    def recording(n, keep, device, **options):
        idx, run = draw(n, keep, device, **options)
        log.append(len(idx))
        return idx, run

    monkeypatch.setattr(draws_module, "draw_rows", recording)
    model = _model((0.4,) * 3)
    accelerate(model)
    model(torch.randn(4, 8))  # the first training call verifies each block's derived forward
    log.clear()
    seen = []
    model[2].fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    x = torch.randn(32, 8)
    with torch.no_grad():
        for _ in range(200):
            model(x)
    assert len(log) == 200 * 6
    assert binom_pvalue(sum(log), 200 * 6 * 32, 0.6) > 1e-4
    # the last branch ran on its kept rows only (a lone kept row beside one dropped row)
    assert seen == [max(2, k) for k in log[5::6] if k > 0]


def test_blocks_it_cannot_rewrite_and_batchnorm_stay_on_the_mask(known):
    model = nn.Sequential(Block(p=0.1), Unknown(p=0.1), BNBlock(p=0.1))
    report = accelerate(model)
    runs = {r.name: (r.runs, r.reason) for r in report}
    assert runs["0.drop_path1"] == ("row subset", "")
    assert runs["1.drop_path1"][0] == "mask"
    assert runs["1.drop_path1"][1] == "rewrite: Unknown.forward calls no site directly"
    assert runs["2.drop_path1"][0] == "mask" and "BatchNorm" in runs["2.drop_path1"][1]
    assert type(model[2]) is BNBlock  # left as it was
    report = accelerate(model, batchnorm="subset")
    assert [r.runs for r in report if r.name.startswith("2.")] == ["row subset"] * 2
    assert type(model[2]) is not BNBlock and isinstance(model[2], BNBlock)
    report = accelerate(model)  # and back
    assert type(model[2]) is BNBlock
    model.train()
    model(torch.randn(4, 8)).sum().backward()  # still works, on the mask


def test_pickle_deepcopy_and_reaccelerate(known):
    model = _model()
    accelerate(model, 0.2)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone[1]) is type(model[1])
    twin = copy.deepcopy(model)
    x = torch.randn(8, 8)
    assert torch.equal(clone.eval()(x), model.eval()(x))
    assert torch.equal(twin.eval()(x), model.eval()(x))
    again = accelerate(model, 0.4)  # changes the rates, keeps one class level
    assert type(model[1]).__bases__[1] is Block
    assert again[-1].rate == pytest.approx(0.4)


def test_residual_sites_are_reported_and_bad_input_named():
    model = nn.Sequential(Residual(nn.Linear(4, 4), 0.1), Residual(nn.Linear(4, 4), 0.1))
    report = accelerate(model)
    assert [(r.runs, r.reason) for r in report] == [("row subset", "droppath Residual")] * 2
    with pytest.raises(TypeError, match="TorchScript"):
        accelerate(torch.jit.script(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        accelerate("model")
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got -0.1"):
        accelerate(model, -0.1)
    with pytest.raises(ValueError, match="rule must be one of"):
        accelerate(model, 0.1, "cubic")
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        accelerate(model, batchnorm="none")


def test_layer_drop_sites_are_reported():
    from droppath import layer_drop

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.lin(x)

    model = nn.Module()
    model.layers = nn.ModuleList(Layer() for _ in range(2))
    layer_drop(model, 0.2, "uniform", mode="batch")
    report = accelerate(model)
    assert [(r.runs, r.reason) for r in report] == [("batch skip", "droppath layer drop")] * 2


# --- depth positions: blocks, with the empty slots -------------------------------------------


def test_positions_count_blocks_and_empty_slots():
    model = _model((0.0, 0.1, 0.2, 0.3))  # block 0: two empty slots (nn.Identity)
    assert [n for n, _, _ in empty_slots(model)] == ["0.drop_path1", "0.drop_path2"]
    names = [n for n, _ in drop_path_sites(model)]
    positions, n = site_positions(model, names)
    assert n == 4 and positions == [1, 1, 2, 2, 3, 3]
    got = dict(set_drop_rates(model, 0.3, "linspace"))
    assert got["1.drop_path1"] == got["1.drop_path2"] == pytest.approx(0.1)
    assert isinstance(model[0].drop_path1, nn.Identity)  # rate 0: the slot stays empty
    got = dict(set_drop_rates(model, 0.3, "uniform"))  # a rate for block 0: the slot is filled
    assert isinstance(model[0].drop_path1, DropPath) and got["0.drop_path1"] == 0.3


def test_none_slots_are_found_and_filled():
    class ResNetStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop_path = None

        def forward(self, x):
            y = self.fc(x)
            if self.drop_path is not None:
                y = self.drop_path(y)
            return x + y

    model = nn.Sequential(ResNetStyle(), ResNetStyle())
    assert len(empty_slots(model)) == 2
    keys = list(model.state_dict())
    assert set_drop_rates(model, 0.5, "linear") == [("0.drop_path", 0.25), ("1.drop_path", 0.5)]
    assert list(model.state_dict()) == keys
    model(torch.randn(3, 4))


def test_a_block_is_the_element_of_a_stack_of_its_class():
    class SubBlock(nn.Module):  # MaxViT-style: a layer of mixed sub-blocks, each with a site
        def __init__(self):
            super().__init__()
            self.stochastic_depth = DropPath(0.1)

    class Other(SubBlock):
        pass

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(SubBlock(), Other(), Other())

    model = nn.Sequential(Layer(), Layer(), Layer())
    names = [n for n, _ in drop_path_sites(model)]
    positions, n = site_positions(model, names)
    assert n == 3 and positions == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_efficientnet_rule():
    assert depth_rates(4, 0.2, "efficientnet") == pytest.approx([0.0, 0.05, 0.1, 0.15])


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_a_skipped_branch_gets_zero_gradients_in_one_process(mode):
    """Issue 27, item 9: as the mask gives (and droppath under DDP), not None, so that the
    optimizer's momentum and weight decay see the parameters as they would have."""
    model = _model((0.5, 0.5))
    accelerate(model)
    for b in model:
        b.drop_path1.mode = b.drop_path2.mode = mode
    model.train()(torch.randn(8, 8)).sum().backward()  # the check runs on this first call
    assert all(b._droppath_state.verified for b in model)
    set_drop_rates(model, 1.0)  # every branch skipped from now on
    model.zero_grad(set_to_none=True)
    model(torch.randn(8, 8)).sum().backward()
    for b in model:
        for q in (*b.fc1.parameters(), *b.fc2.parameters()):
            assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


def test_calls_that_cannot_tell_postpone_the_check():
    """Issue 27, item 2: a probe's call (fake tensors, the meta device, no grad, inference mode,
    one sample) neither passes nor fails a block's check; the next real call makes it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from droppath.acceleration import check_states

    model = _model((0.3, 0.3))
    accelerate(model)
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True):  # a memory estimator
        model(torch.empty(8, 8))
    with torch.no_grad():
        model(torch.randn(8, 8))
    with torch.inference_mode():
        model(torch.randn(8, 8))
    model(torch.randn(1, 8))
    assert set(check_states(model).values()) == {"pending"}
    meta = copy.deepcopy(model).to("meta")  # a shape probe on the meta device
    meta(torch.empty(8, 8, device="meta"))
    assert set(check_states(meta).values()) == {"pending"}
    model(torch.randn(8, 8))
    assert set(check_states(model).values()) == {"verified"}


def test_a_failed_check_is_reported_and_accelerate_clears_it(monkeypatch):
    """Issue 27, items 2 and 5: the report says which blocks fell back to the mask and why;
    calling accelerate again checks them again."""
    import droppath.acceleration as acc

    model = _model((0.3, 0.3))
    accelerate(model)
    with monkeypatch.context() as m:
        m.setattr(acc, "verify", lambda *a, **k: "verify: output item 0 differs (planted)")
        with pytest.warns(UserWarning, match="stays on the mask"):
            model.train()(torch.randn(8, 8))
    assert all(
        s.startswith("failed: verify: output item 0") for s in acc.check_states(model).values()
    )
    report = accelerate(model)
    assert report.counts()["mask"] == 4
    assert all("failed its check (verify: output item 0 differs" in r.reason for r in report)
    assert set(acc.check_states(model).values()) == {"pending"}
    model(torch.randn(8, 8))
    assert set(acc.check_states(model).values()) == {"verified"}
    assert accelerate(model).counts()["row subset"] == 4


def test_the_first_call_check_is_invisible_to_hooks_and_dispatch_modes():
    """Issue 27, item 1: the check's two extra forwards fire no hook of the user's and record
    nothing in a dispatch mode; a call looks like one call of the untouched model."""
    from torch.utils.flop_counter import FlopCounterMode

    from droppath.acceleration import check_states

    torch.manual_seed(0)
    plain = _model((0.3, 0.3))
    model = copy.deepcopy(plain)
    accelerate(model)
    calls = []
    model[1].fc1.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    global_calls = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, o: global_calls.append(type(m).__name__)
    )
    try:
        x = torch.randn(8, 8)
        with FlopCounterMode(display=False) as counted:
            model.train()(x)
        with FlopCounterMode(display=False) as counted_plain:
            plain.train()(x)
    finally:
        handle.remove()
    assert set(check_states(model).values()) == {"verified"}  # the check did run
    assert len(calls) == 1  # 3 before: the original's and the derived forward's runs too
    assert global_calls.count("Linear") <= 4 + 4  # both models' four Linear calls, once each
    assert counted.get_total_flops() <= counted_plain.get_total_flops()


def test_check_verifies_up_front_and_leaves_nothing_behind(monkeypatch):
    """Issue 27, item 4: what the run will do is known before it starts."""
    import droppath.acceleration as acc
    from droppath import check

    model = _model((0.0, 0.0, 0.0), block=BNBlock)  # rates 0: checked all the same
    accelerate(model, batchnorm="subset")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 8)
    rng = torch.get_rng_state()
    assert check(model, x) == {"0": "verified", "1": "verified", "2": "verified"}
    assert not model.training and all(not m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too
    assert all(q.grad is None for q in model.parameters())
    one = _model((0.3,))
    accelerate(one)
    assert check(one, torch.randn(1, 8)) == {"0": "pending"}  # one sample cannot tell
    monkeypatch.setattr(acc, "verify", lambda *a, **k: "verify: output item 0 differs (planted)")
    states = check(model, torch.randn(8, 8))
    assert all(s == "failed: verify: output item 0 differs (planted)" for s in states.values())


def test_a_block_adding_into_a_dropped_branch_in_place_trains():
    """timm's ResNet blocks do ``x = self.drop_path(x); x += shortcut``: where every row is
    dropped, the zeros that stand for the branch are a new tensor (with the skipped parameters'
    zero gradients), which the block may change in place."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop_path = nn.Linear(8, 8), nn.Identity()

        def forward(self, x):
            shortcut = x
            x = self.drop_path(self.lin(x))
            x += shortcut
            return x.relu_()

    model = nn.Sequential(InPlace(), InPlace())
    accelerate(model, 0.5, rule="uniform")
    model.train()(torch.randn(8, 8)).sum().backward()  # checked
    set_drop_rates(model, 1.0)
    model.zero_grad()
    model(torch.randn(8, 8, requires_grad=True)).sum().backward()
    assert all(torch.equal(q.grad, torch.zeros_like(q)) for q in model.parameters())


def test_a_block_keeps_its_state_in_one_object_through_copies():
    """Issue 28, item 3: one state object per accelerated block (no keys in ``__dict__``, no
    global switch), carried by deepcopy and pickle: a copy has the same class and parameters."""
    from droppath._derive.state import BlockState

    model = _model((0.3, 0.3))
    accelerate(model)
    model.train()(torch.randn(8, 8))
    assert isinstance(model[0]._droppath_state, BlockState) and model[0]._droppath_state.verified
    assert not [
        k for b in model for k in vars(b) if k.startswith("_droppath_") and k != "_droppath_state"
    ]
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(b._droppath_state.verified for b in twin)
        assert twin[0]._droppath_state is not model[0]._droppath_state
        twin(torch.randn(8, 8))
