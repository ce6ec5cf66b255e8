"""Tests of the classic op: droppath.drop_path and droppath.DropPath."""

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import binom_pvalue
from droppath import DropPath, drop_path

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def reference_drop_path(x, p, mode, batch_dim, generator):
    """An independent formulation: a float32 uniform draw below 1 - p keeps, divided by 1 - p."""
    keep = 1.0 - p
    shape = [1] * x.dim()
    if mode == "row":
        shape[batch_dim] = x.shape[batch_dim]
    mask = (torch.rand(shape, generator=generator) < keep).float()
    return x * (mask / keep).to(x.dtype)


def rows(t, batch_dim=0):
    return t.movedim(batch_dim, 0).reshape(t.shape[batch_dim], -1)


class TestAgainstReference:
    @pytest.mark.parametrize("mode", ["row", "batch"])
    @pytest.mark.parametrize("batch_dim", [0, 1, -1])
    def test_module_function_reference_agree(self, mode, batch_dim):
        x = torch.randn(5, 7, 3)
        out_ref = reference_drop_path(x, 0.3, mode, batch_dim % 3, torch.Generator().manual_seed(3))
        out_fn = drop_path(
            x, 0.3, mode=mode, batch_dim=batch_dim, generator=torch.Generator().manual_seed(3)
        )
        torch.manual_seed(11)
        out_mod = DropPath(0.3, mode=mode, batch_dim=batch_dim)(x)
        torch.manual_seed(11)
        out_fn_global = drop_path(x, 0.3, mode=mode, batch_dim=batch_dim)
        torch.testing.assert_close(out_fn, out_ref, rtol=0, atol=0)
        torch.testing.assert_close(out_mod, out_fn_global, rtol=0, atol=0)


class TestEdges:
    def test_p_zero_returns_input(self):
        x = torch.randn(4, 3)
        assert drop_path(x, 0.0) is x
        assert DropPath(0.0)(x) is x

    def test_eval_returns_input(self):
        x = torch.randn(4, 3)
        assert drop_path(x, 0.7, training=False) is x
        assert DropPath(0.7).eval()(x) is x

    @pytest.mark.parametrize("mode", ["row", "batch"])
    @pytest.mark.parametrize("scale_by_keep", [True, False])
    def test_p_one_gives_zeros(self, mode, scale_by_keep):
        x = torch.randn(16, 3, requires_grad=True)
        y = drop_path(x, 1.0, mode=mode, scale_by_keep=scale_by_keep)
        assert torch.equal(y, torch.zeros_like(x))
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))

    @pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
    def test_kept_rows_are_scaled_exactly(self, p):
        x = torch.randn(200, 4, 5)
        y = drop_path(x, p)
        kept = rows(y).abs().sum(1) > 0
        assert 0 < kept.sum() < 200
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))
        assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))

    def test_scale_by_keep_false_leaves_kept_values(self):
        x = torch.randn(100, 3)
        y = drop_path(x, 0.5, scale_by_keep=False)
        kept = rows(y).abs().sum(1) > 0
        assert torch.equal(y[kept], x[kept])

    def test_batch_mode_is_all_or_nothing(self):
        x = torch.randn(32, 3)
        outcomes = set()
        for seed in range(40):
            y = drop_path(x, 0.5, mode="batch", generator=torch.Generator().manual_seed(seed))
            if torch.equal(y, torch.zeros_like(x)):
                outcomes.add("dropped")
            else:
                torch.testing.assert_close(y, 2 * x)
                outcomes.add("kept")
        assert outcomes == {"dropped", "kept"}

    @pytest.mark.parametrize("batch_dim", [1, -2, 2])
    def test_batch_dim(self, batch_dim):
        x = torch.randn(3, 50, 4) + 10  # no zeros in x
        y = drop_path(x, 0.5, batch_dim=batch_dim)
        r = rows(y, batch_dim)
        dropped = (r == 0).all(1)
        kept = (r != 0).all(1)
        assert torch.equal(dropped | kept, torch.ones_like(kept))

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_dtypes(self, dtype):
        x = torch.randn(64, 8).to(dtype)
        y = drop_path(x, 0.25)
        assert y.dtype == dtype
        kept = rows(y).abs().sum(1) > 0
        torch.testing.assert_close(y[kept], (x[kept].double() / 0.75).to(dtype))

    def test_channels_last_is_kept(self):
        x = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
        y = drop_path(x, 0.5)
        assert y.is_contiguous(memory_format=torch.channels_last)

    def test_empty_batch(self):
        x = torch.randn(0, 4)
        assert drop_path(x, 0.5).shape == (0, 4)

    def test_rank_one(self):
        x = torch.randn(1000) + 10
        y = drop_path(x, 0.5)
        assert ((y == 0) | torch.isclose(y, 2 * x)).all()

    def test_generator_reproduces_mask(self):
        x = torch.randn(64, 3)
        a = drop_path(x, 0.5, generator=torch.Generator().manual_seed(7))
        b = drop_path(x, 0.5, generator=torch.Generator().manual_seed(7))
        c = drop_path(x, 0.5, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)

    def test_input_is_not_modified(self):
        x = torch.randn(64, 3)
        before = x.clone()
        drop_path(x, 0.5)
        assert torch.equal(x, before)

    def test_backward_through_relu_branch(self):
        # The tutorial's in-place variant breaks here: ReLU's backward needs its output.
        lin = nn.Linear(4, 4)
        x = torch.randn(16, 4)
        h = torch.relu(lin(x))
        y = drop_path(h, 0.5)
        (x + y).sum().backward()
        assert lin.weight.grad is not None

    def test_gradient_is_the_mask(self):
        x = torch.randn(50, 3, requires_grad=True)
        y = drop_path(x, 0.4)
        y.sum().backward()
        kept = rows(y.detach()).abs().sum(1) > 0
        torch.testing.assert_close(x.grad[kept], torch.full_like(x[kept], 1 / 0.6))
        assert torch.equal(x.grad[~kept], torch.zeros_like(x[~kept]))

    def test_gradcheck(self):
        x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)

        def fn(t):
            return drop_path(t, 0.5, generator=torch.Generator().manual_seed(1))

        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


class TestStatistics:
    @pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
    @pytest.mark.parametrize("mode", ["row", "batch"])
    def test_drop_rate_binomial(self, p, mode):
        n_rows = 64 if mode == "row" else 1
        kept = trials = 0
        x = torch.ones(n_rows, 2)
        for seed in range(1500):
            y = drop_path(x, p, mode=mode, generator=torch.Generator().manual_seed(seed))
            kept += int((y[:, 0] != 0).sum())
            trials += n_rows
        assert binom_pvalue(kept, trials, 1 - p) > 1e-4

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_keep_rate_exact_in_low_precision(self, dtype):
        # bfloat16 rounds 0.99 to 0.98828125: a mask drawn in that precision would be caught here
        # (about 17 standard deviations away).
        x = torch.ones(1_000_000, 1, dtype=dtype)
        y = drop_path(x, 0.01, generator=torch.Generator().manual_seed(0))
        kept = int((y != 0).sum())
        assert binom_pvalue(kept, x.shape[0], 0.99) > 1e-4

    def test_expectation_is_unchanged(self):
        x = torch.randn(4, 3)
        acc = torch.zeros_like(x)
        n = 20000
        for _ in range(n // 500):
            acc += drop_path(x.expand(500, 4, 3).reshape(500, 4, 3), 0.3).mean(0)
        mean = acc / (n // 500)
        torch.testing.assert_close(mean, x, atol=0.05, rtol=0)


class TestBadInput:
    @pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
    def test_bad_p(self, p):
        x = torch.randn(2, 2)
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got"):
            drop_path(x, p)
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got"):
            DropPath(p)

    @pytest.mark.parametrize("p", ["0.5", None, True])
    def test_p_of_wrong_type(self, p):
        with pytest.raises(TypeError, match="p must be a probability"):
            drop_path(torch.randn(2), p)
        with pytest.raises(TypeError, match="p must be a probability"):
            DropPath(p)

    def test_bad_mode(self):
        with pytest.raises(ValueError, match="mode must be one of 'row', 'batch', got 'rows'"):
            drop_path(torch.randn(2, 2), 0.1, mode="rows")
        with pytest.raises(ValueError, match="mode must be one of 'row', 'batch', got 'rows'"):
            DropPath(0.1, mode="rows")

    def test_bad_batch_dim(self):
        with pytest.raises(
            ValueError, match=r"batch_dim must be in \[-2, 1\] for a 2-D input, got 2"
        ):
            drop_path(torch.randn(2, 2), 0.1, batch_dim=2)
        with pytest.raises(TypeError, match="batch_dim must be an int, got 0.5"):
            DropPath(0.1, batch_dim=0.5)
        with pytest.raises(
            ValueError, match=r"batch_dim must be in \[-1, 0\] for a 1-D input, got 3"
        ):
            DropPath(0.1, batch_dim=3)(torch.randn(4))

    def test_zero_dim(self):
        with pytest.raises(ValueError, match="x must have at least 1 dimension, got a 0-D tensor"):
            drop_path(torch.tensor(1.0), 0.1)
        with pytest.raises(ValueError, match="at least 1 dimension"):
            DropPath(0.1)(torch.tensor(1.0))

    @pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
    def test_bad_dtype(self, dtype):
        with pytest.raises(
            TypeError, match=f"x must be a floating point tensor, got dtype {dtype}"
        ):
            drop_path(torch.zeros(2, 2, dtype=dtype), 0.1)
        with pytest.raises(TypeError, match="floating point"):
            DropPath(0.1)(torch.zeros(2, 2, dtype=dtype))

    def test_bad_scale_by_keep(self):
        with pytest.raises(TypeError, match="scale_by_keep must be True or False, got 1"):
            DropPath(0.1, scale_by_keep=1)

    @pytest.mark.parametrize("kind", ["DropPath", "Residual", "LayerDrop"])
    def test_a_bad_setting_is_refused_at_assignment(self, kind):
        from droppath import LayerDrop, Residual

        make = {
            "DropPath": lambda: DropPath(0.1),
            "Residual": lambda: Residual(nn.Linear(2, 2), 0.1),
            "LayerDrop": lambda: LayerDrop(nn.Linear(2, 2), 0.1),
        }[kind]
        m = make()
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2.0"):
            m.p = 2.0
        with pytest.raises(
            TypeError, match="p must be a probability in \\[0, 1\\], got '0.1' of type str"
        ):
            m.p = "0.1"
        with pytest.raises(ValueError, match="mode must be one of 'row', 'batch', got 'rows'"):
            m.mode = "rows"
        with pytest.raises(TypeError, match="scale_by_keep must be True or False, got 1"):
            m.scale_by_keep = 1
        with pytest.raises(TypeError, match="batch_dim must be an int, got 0.5"):
            m.batch_dim = 0.5
        assert (m.p, m.mode, m.scale_by_keep, m.batch_dim) == (0.1, "row", True, 0)
        m.p = 1  # a valid rate is stored as a float
        assert m.p == 1.0 and type(m.p) is float


class TestModule:
    def test_live_attributes(self):
        m = DropPath(0.0)
        x = torch.randn(100, 3)
        assert m(x) is x
        m.p = 1.0
        assert torch.equal(m(x), torch.zeros_like(x))
        m.mode = "batch"
        m.p = 0.5
        y = m(x)
        assert torch.equal(y, torch.zeros_like(x)) or torch.allclose(y, 2 * x)

    def test_no_state(self):
        m = DropPath(0.3)
        assert list(m.parameters()) == [] and list(m.buffers()) == []
        assert m.state_dict() == {}

    def test_extra_repr(self):
        assert repr(DropPath(0.25, mode="batch", batch_dim=1, scale_by_keep=False)) == (
            "DropPath(p=0.25, mode='batch', batch_dim=1, scale_by_keep=False)"
        )

    def test_pickle_and_deepcopy(self):
        m = DropPath(0.3, mode="batch", batch_dim=-1)
        for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert isinstance(clone, DropPath)
            assert (clone.p, clone.mode, clone.batch_dim) == (0.3, "batch", -1)
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        assert torch.load(buf, weights_only=True) == {}


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=5),
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    p=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    mode=st.sampled_from(["row", "batch"]),
)
def test_property_shapes_ranks_dims_dtypes(shape, data, dtype, p, mode):
    ndim = len(shape)
    batch_dim = data.draw(st.integers(-ndim, ndim - 1))
    x = (torch.rand(shape) + 1).to(dtype)  # strictly positive: zeros mean dropped
    y = drop_path(x, p, mode=mode, batch_dim=batch_dim)
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel() == 0:
        return
    r_in, r_out = rows(x, batch_dim), rows(y, batch_dim)
    for a, b in zip(r_in, r_out):
        if p == 1.0 or (b == 0).all():
            assert (b == 0).all()
        else:
            torch.testing.assert_close(b, (a.double() / (1 - p)).to(dtype))
    if mode == "batch":
        assert (r_out == 0).all() or (r_out != 0).all()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = DropPath(0.5)

    def forward(self, x):
        return x + self.drop(self.lin(x))


RANDOM_OPS = ("bernoulli", "rand", "uniform", "dropout", "normal")


class TestGraphCapture:
    def test_compile_fullgraph_training(self):
        torch._dynamo.reset()
        m = Net().train()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        x = torch.randn(64, 8) + 10
        y = compiled(x)
        y.sum().backward()
        branch = (y - x).detach()
        dropped = (branch == 0).all(1)
        kept = torch.isclose(branch, 2 * m.lin(x).detach(), atol=1e-5).all(1)
        assert (dropped | kept).all() and dropped.any() and kept.any()

    def test_compile_fullgraph_inductor(self):
        torch._dynamo.reset()
        m = DropPath(0.5)
        compiled = torch.compile(m, fullgraph=True)
        x = torch.rand(64, 8) + 1
        y = compiled(x)
        r = rows(y)
        assert (((r == 0).all(1)) | torch.isclose(r, 2 * x).all(1)).all()

    def test_fx_submodule_is_one_node_that_follows_train_and_eval(self):
        m = Net().train()
        gm = torch.fx.symbolic_trace(m)
        nodes = [
            (n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")
        ]
        assert ("call_module", "drop") in nodes
        assert not [t for op, t in nodes if op == "call_function" and t is drop_path]
        x = torch.randn(64, 8) + 10
        expected = 2 * m.lin(x).detach()
        r = rows((gm(x) - x).detach())
        dropped, kept = (r == 0).all(1), torch.isclose(r, expected, atol=1e-5).all(1)
        assert (dropped | kept).all() and dropped.any() and kept.any()
        gm.eval()  # traced in training mode, run in eval: no drop, as nn.Dropout
        torch.testing.assert_close(gm(x), m.eval()(x), rtol=0, atol=0)
        gm.drop.p = 1.0  # the node is the live module: its settings still apply
        gm.train()
        torch.testing.assert_close(gm(x), x, rtol=0, atol=0)

    def test_fx_root_follows_train_and_eval(self):
        gm = torch.fx.symbolic_trace(DropPath(0.5).train())
        x = torch.rand(64, 8) + 1
        assert gm.eval()(x) is x
        r = rows(gm.train()(x))
        dropped, kept = (r == 0).all(1), torch.isclose(r, 2 * x).all(1)
        assert (dropped | kept).all() and dropped.any() and kept.any()

    def test_fx_user_code_calling_drop_path(self):
        class UserNet(nn.Module):
            def forward(self, x):
                return x + drop_path(x, 0.5, self.training)

        gm = torch.fx.symbolic_trace(UserNet().train())
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is drop_path]
        assert len(calls) == 1 and calls[0].args[1:] == (0.5, True)
        x = torch.rand(64, 8) + 1
        r = rows(gm(x) - x)
        assert ((r == 0).all(1) | torch.isclose(r, 2 * x).all(1)).all()

    def test_export_eval_has_no_random_op(self):
        m = Net().eval()
        ep = torch.export.export(m, (torch.randn(4, 8),))
        names = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert not [n for n in names if any(r in n for r in RANDOM_OPS)], names
        x = torch.randn(4, 8)
        torch.testing.assert_close(ep.module()(x), m(x))

    def test_export_training_keeps_the_random_op(self):
        # The check above can fail: the training graph does contain the draw.
        m = Net().train()
        ep = torch.export.export(m, (torch.randn(4, 8),))
        names = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert any(r in n for n in names for r in RANDOM_OPS), names

    def test_onnx_eval_has_no_random_op(self, tmp_path):
        onnx = pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
        m = Net().eval()
        path = tmp_path / "net.onnx"
        torch.onnx.export(m, (torch.randn(4, 8),), str(path))
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert not ops & {"RandomUniform", "RandomUniformLike", "Bernoulli", "Dropout"}, ops
