"""draw_ahead: decisions drawn before the forward, each Residual's step in the model's graph."""

import copy
import pickle

import pytest
import torch
from torch import nn

from conftest import binom_pvalue
from droppath import (
    DropRateScheduler,
    LayerDrop,
    Residual,
    accelerate,
    draw_ahead,
    layer_drop,
    set_drop_rates,
)
from droppath._engine import DropSpec, predraw
from stand_ins import TimmDropPath


def _mlp(width=16):
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
    )


def _stack(depth=4, p=0.3, **kw):
    return nn.Sequential(*[Residual(_mlp(), p, **kw) for _ in range(depth)])


def _grads(model):
    return [torch.zeros_like(q) if q.grad is None else q.grad for q in model.parameters()]


def _step(model, x, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


class _Counting:
    """A compile backend that counts the graphs compiled and the graph calls."""

    def __init__(self):
        self.compiled = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_same_step_as_the_host_side_draws(p):
    """A one-block model draws the same decisions ahead as the block draws for itself (the same
    random state): the same output, input gradient and parameter gradients."""
    torch.manual_seed(0)
    plain = Residual(_mlp(), p, strategy="subset")
    ahead = copy.deepcopy(plain)
    draw_ahead(ahead)
    x = torch.randn(12, 3, 16)
    for seed in range(3):
        out_a, gx_a = _step(plain, x, seed)
        out_b, gx_b = _step(ahead, x, seed)
        torch.testing.assert_close(out_a, out_b)
        torch.testing.assert_close(gx_a, gx_b)
    assert ahead._ahead is not None
    for a, b in zip(_grads(plain), _grads(ahead)):
        torch.testing.assert_close(a, b)  # every row dropped: zeros, from two fillers


def test_compiled_equals_eager_and_is_one_graph_per_forward():
    """The issue's count: a stack of 12 blocks, compiled, its rates changed at every step by a
    schedule and the batch size changed once: one graph per forward after the first step (the
    hook's break before it, none of a block's own), and nothing recompiled by the rates."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _stack(12)
    reference = copy.deepcopy(model)
    draw_ahead(reference)
    draw_ahead(model)
    sched = DropRateScheduler(model, 0.5, depth_rule="linear", time_rule="warmup", warmup_steps=8)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    calls, compiled_counts = [], []
    for step in range(10):
        x = torch.randn(24 if step == 6 else 32, 4, 16)
        backend.calls = 0
        out, gx = _step(compiled, x, step)
        calls.append(backend.calls)
        compiled_counts.append(backend.compiled)
        set_drop_rates(reference, sched.get_last_p(), "model")
        ref_out, ref_gx = _step(reference, x, step)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(gx, ref_gx)
        sched.step()
    assert calls == [1] * 10, calls
    # one graph, and one more for the batch size that changed (then dynamic)
    assert compiled_counts[-1] <= 2 and compiled_counts[5] == compiled_counts[0], compiled_counts
    assert len(set(sched.get_last_p())) > 1


def test_drawn_rows_keep_each_sample_with_probability_one_minus_p():
    spec = DropSpec(0.3)
    torch.manual_seed(0)
    kept = runs = 0
    for _ in range(400):
        drawn = predraw(spec, 10, torch.device("cpu"))
        n_kept = int((drawn.rows > 0).sum())
        kept += n_kept
        runs += 1
        # the weights: the scale at the kept rows run first, 0 at fillers
        assert drawn.weights[:n_kept].eq(1 / 0.7).all() and drawn.weights[n_kept:].eq(0).all()
        assert drawn.run.shape[0] >= 2
        assert torch.equal(drawn.run[drawn.where[drawn.rows > 0]], (drawn.rows > 0).nonzero()[:, 0])
    assert binom_pvalue(kept, 10 * runs, 0.7) > 1e-4


def test_bucket_fillers_carry_no_weight():
    drawn = predraw(DropSpec(0.5, bucket=8), 64, torch.device("cpu"))
    assert drawn.run.shape[0] % 8 == 0
    assert int((drawn.weights > 0).sum()) == int((drawn.rows > 0).sum())


class _Checkpointed(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, x, use_reentrant=False)


def test_checkpointed_block_recomputes_the_same_rows():
    """The recomputation in backward reads the decisions its forward read."""
    torch.manual_seed(0)
    plain = _stack(3, 0.5)
    ckpt = nn.Sequential(*[_Checkpointed(b) for b in copy.deepcopy(plain)])
    draw_ahead(plain)
    draw_ahead(ckpt)
    x = torch.randn(16, 16)
    for seed in range(3):
        out_a, gx_a = _step(plain, x, seed)
        out_b, gx_b = _step(ckpt, x, seed)
        torch.testing.assert_close(out_a, out_b)
        torch.testing.assert_close(gx_a, gx_b)
    for a, b in zip(_grads(plain), _grads(ckpt)):
        torch.testing.assert_close(a, b)


def test_channels_last_conv_block_and_bfloat16_autocast():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    plain = Residual(conv, 0.5, strategy="subset").to(memory_format=torch.channels_last)
    ahead = copy.deepcopy(plain)
    draw_ahead(ahead)
    x = torch.randn(8, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    out_a, gx_a = _step(plain, x, 1)
    out_b, gx_b = _step(ahead, x, 1)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    assert out_b.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(2)
        lin_a = Residual(nn.Linear(16, 16), 0.5)
        lin_b = copy.deepcopy(lin_a)
        draw_ahead(lin_b)
        x = torch.randn(8, 16)
        lin_b(x)
        torch.manual_seed(4)
        ya = lin_a(x)
        torch.manual_seed(4)
        yb = lin_b(x)
    assert ya.dtype == yb.dtype == torch.float32
    torch.testing.assert_close(ya, yb)


def test_sites_it_leaves_alone_eval_and_remove():
    model = nn.Sequential(
        Residual(_mlp(), 0.3, mode="batch"),
        Residual(_mlp(), 0.3, strategy="mask"),
        Residual(_mlp()),
    )
    handle = draw_ahead(model)
    x = torch.randn(8, 16)
    model(x)
    assert model[0]._ahead is None and model[1]._ahead is None
    assert model[2]._ahead is not None and model[2].auto_choice == "subset"
    assert "auto='subset'" in repr(model[2])
    model.eval()
    torch.testing.assert_close(model(x), model[2](model[1](model[0](x))))
    assert model[2]._ahead is None
    model.train()
    model(x)
    handle.remove()
    assert model[2]._ahead is None and not model._forward_pre_hooks
    with draw_ahead(model):
        model(x)
        assert model[2]._ahead is not None
    assert model[2]._ahead is None


def test_pickles_without_its_decisions():
    model = _stack(2)
    draw_ahead(model)
    model(torch.randn(4, 16))
    loaded = pickle.loads(pickle.dumps(model))
    assert "_ahead" not in loaded[0].__dict__
    loaded(torch.randn(4, 16))  # its hook came along and draws again
    assert loaded[0]._ahead is not None


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        draw_ahead(1)
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator or None"):
        draw_ahead(nn.Linear(2, 2), generator="cpu")


# Blocks that accelerate rewrites, with timm's DropPath (a stand-in of the same name): a sum with
# a per-sample side input and a layer scale after the site, and a site whose output is not added
# to a shortcut (its rows are computed for the kept samples only, zeros elsewhere).


class _SumBlock(nn.Module):
    def __init__(self, p=0.4):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gamma = nn.Parameter(torch.randn(16))
        self.drop_path = TimmDropPath(p)

    def forward(self, x, bias):
        return x + self.drop_path(self.fc(x + bias)) * self.gamma


class _RowsBlock(nn.Module):
    def __init__(self, p=0.4):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.drop_path = TimmDropPath(p)

    def forward(self, x, bias):
        return torch.cat([x[..., :8], self.drop_path(self.fc(x - bias))], -1)


class _Net(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, bias=None):
        for block in self.blocks:
            x = block(x, bias)
        return x


def _net_step(model, x, bias, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x, bias=bias)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


@pytest.mark.parametrize("block", [_SumBlock, _RowsBlock])
def test_accelerated_block_takes_the_same_step(block):
    """One rewritten site: the decisions drawn ahead are those it draws for itself, so the step
    is the same (its derived forward is checked in the hook's eager run first)."""
    torch.manual_seed(0)
    plain = _Net(block())
    accelerate(plain)
    ahead = copy.deepcopy(plain)
    draw_ahead(ahead)
    x, bias = torch.randn(12, 3, 16), torch.randn(12, 3, 16)
    for seed in range(3):
        out_a, gx_a = _net_step(plain, x, bias, seed)
        out_b, gx_b = _net_step(ahead, x, bias, seed)
        torch.testing.assert_close(out_a, out_b)
        torch.testing.assert_close(gx_a, gx_b)
    assert ahead.blocks[0]._droppath_state.verified
    assert ahead.blocks[0].drop_path._ahead is not None
    for a, b in zip(_grads(plain), _grads(ahead)):
        torch.testing.assert_close(a, b)


def test_accelerated_model_compiles_to_one_graph_per_forward():
    """Accelerated blocks under draw_ahead: checked before the first graph (no check inside it),
    then one graph per forward under changing rates, equal to the eager steps; at rate 0 the
    eager step is the original's, bit for bit."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    original = _Net(_SumBlock(), _RowsBlock(), _SumBlock())
    model = copy.deepcopy(original)
    accelerate(model)
    reference = copy.deepcopy(model)
    draw_ahead(model)
    draw_ahead(reference)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    x, bias = torch.randn(16, 3, 16), torch.randn(16, 3, 16)
    for step in range(6):
        set_drop_rates(model, 0.1 * step, "linear")
        set_drop_rates(reference, 0.1 * step, "linear")
        backend.calls = 0
        out, gx = _net_step(compiled, x, bias, step)
        assert backend.calls == 1, (step, backend.calls)
        ref_out, ref_gx = _net_step(reference, x, bias, step)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(gx, ref_gx)
    assert backend.compiled == 1
    set_drop_rates(reference, 0.0, "uniform")
    assert torch.equal(reference(x, bias=bias), original(x, bias=bias))


# Layer-drop sites (LayerDrop, and the layers layer_drop converts): a layer with a batch-shaped
# side input that takes gradients, a broadcast one, and a tuple output.


class _Layer(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x, gate, pos=None, use_cache=False):
        h = x + torch.tanh(self.lin(x)) * gate + (0 if pos is None else pos)
        return h, None


class _Layers(nn.Module):
    def __init__(self, depth=3, wrapped=False, p=0.5, **kw):
        super().__init__()
        self.layers = nn.ModuleList(_Layer() for _ in range(depth))
        if wrapped:
            self.layers = nn.ModuleList(LayerDrop(m, p, **kw) for m in self.layers)
        else:
            layer_drop(self, p, "uniform", **kw)

    def forward(self, x, gate):
        pos = torch.ones(1, x.shape[1], 1) * 0.1  # broadcast over the batch: passed as is
        for layer in self.layers:
            out = layer(x, gate, pos=pos)
            # a host-side step that drops every sample before the layer ever ran cannot know
            # its output's structure: it returns the hidden states alone
            x = out if isinstance(out, torch.Tensor) else out[0]
        return x


def _layers_step(model, x, gate, seed):
    x, gate = x.clone().requires_grad_(), gate.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x, gate)
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad, gate.grad


@pytest.mark.parametrize("wrapped", [False, True], ids=["layer_drop", "LayerDrop"])
@pytest.mark.parametrize(
    ("p", "scale_by_keep"), [(0.0, True), (0.5, True), (0.5, False), (1.0, True)]
)
def test_layer_drop_sites_take_the_same_step(wrapped, p, scale_by_keep):
    """Under the same random state, the decisions drawn ahead are the layers' own: the same
    output (bitwise: a kept row is lerp(x, L(x), scale) in both), input, side-input and parameter
    gradients."""
    torch.manual_seed(0)
    plain = _Layers(wrapped=wrapped, p=p, scale_by_keep=scale_by_keep)
    ahead = copy.deepcopy(plain)
    draw_ahead(ahead)
    x, gate = torch.randn(12, 3, 16), torch.rand(12, 3, 1)
    for seed in range(3):
        out_a, *grads_a = _layers_step(plain, x, gate, seed)
        out_b, *grads_b = _layers_step(ahead, x, gate, seed)
        assert torch.equal(out_a, out_b)
        for a, b in zip(grads_a, grads_b):  # at p = 1 the gate is unused (None) or gets zeros
            torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b)
    first = ahead.layers[0]
    assert (first if wrapped else first.layer_drop)._ahead is not None  # the step drawn ahead
    for a, b in zip(_grads(plain), _grads(ahead)):
        torch.testing.assert_close(a, b)


def test_layer_drop_compiles_to_one_graph_per_forward():
    """Converted layers under a schedule, compiled: one graph call per forward, one graph
    compiled, equal to the eager steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Layers(depth=6)
    reference = copy.deepcopy(model)
    draw_ahead(model)
    draw_ahead(reference)
    sched = DropRateScheduler(model, 0.5, depth_rule="linear", time_rule="warmup", warmup_steps=4)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    x, gate = torch.randn(16, 3, 16), torch.rand(16, 3, 1)
    for step in range(6):
        backend.calls = 0
        out, *grads = _layers_step(compiled, x, gate, step)
        assert backend.calls == 1, (step, backend.calls)
        set_drop_rates(reference, sched.get_last_p(), "model")
        ref_out, *ref_grads = _layers_step(reference, x, gate, step)
        torch.testing.assert_close(out, ref_out)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
        sched.step()
    assert backend.compiled == 1
    assert len(set(sched.get_last_p())) > 1


def test_layer_drop_with_a_cache_remove_and_pickle():
    """A layer asked for a cache takes the host-side step (whole layer, a warning); remove()
    clears the converted layers' decisions; pickles leave them out."""
    model = _Layers()
    handle = draw_ahead(model)
    x, gate = torch.randn(8, 3, 16), torch.rand(8, 3, 1)
    model(x, gate)
    settings = model.layers[0].layer_drop
    assert settings._ahead is not None and settings._ahead_rows is None  # drawn for x's batch
    with pytest.warns(UserWarning, match="use_cache=False"):
        out = model.layers[0](x, gate, use_cache=True)[0]
    assert settings._ahead_rows == (8, torch.device("cpu"))  # the host-side step ran
    torch.testing.assert_close(out, model.layers[0].eval()(x, gate, use_cache=True)[0])
    model.train()
    loaded = pickle.loads(pickle.dumps(model))
    assert loaded.layers[0].layer_drop._ahead is None
    loaded(x, gate)  # its hook came along and draws again
    assert loaded.layers[0].layer_drop._ahead is not None
    handle.remove()
    assert settings._ahead is None
