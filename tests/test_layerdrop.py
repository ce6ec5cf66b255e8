"""Tests of layer drop: droppath.LayerDrop and droppath.layer_drop (stand-in layers here; the real
Hugging Face models are in tests/integration/test_layerdrop_transformers.py)."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import binom_pvalue
from droppath import (
    DropRateScheduler,
    LayerDrop,
    SkippedLayer,
    depth_rates,
    drop_path_sites,
    layer_drop,
    prune,
    set_drop_rates,
)


class MaskedLayer(nn.Module):
    """``x + f(x, mask, pos)``, per sample, recording the batch sizes it ran on."""

    def __init__(self, dim=4):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.calls = []

    def forward(self, x, mask, position_embeddings=None, scale=1.0, positions=None):
        self.calls.append(x.shape[0])
        cos, sin = position_embeddings
        assert mask.shape[0] in (1, x.shape[0]) and cos.shape[0] in (1, x.shape[0])
        return x + scale * torch.tanh(self.lin(x * cos + sin)) * mask


def _inputs(n=16, t=3, d=4):
    x = torch.randn(n, t, d)
    mask = (torch.rand(n, t, 1) > 0.3).float()
    pos = (torch.randn(n, t, d), torch.randn(1, t, d))  # one batch-shaped, one broadcast
    return x, mask, pos


def _per_row(layer, x, mask, pos):
    """The layer run on every row alone: what each kept row must equal."""
    rows = []
    for i in range(x.shape[0]):
        cos, sin = pos
        rows.append(layer(x[i : i + 1], mask[i : i + 1], position_embeddings=(cos[i : i + 1], sin)))
    return torch.cat(rows)


class TestLayerDrop:
    def test_dropped_rows_pass_kept_rows_are_the_layer_on_their_own_inputs(self):
        torch.manual_seed(0)
        site = LayerDrop(MaskedLayer(), p=0.5, scale_by_keep=False)
        x, mask, pos = _inputs()
        out = site(x, mask, position_embeddings=pos, positions=torch.arange(16))
        alone = _per_row(site.layer, x, mask, pos).detach()
        kept = torch.isclose(out, alone, atol=1e-6).flatten(1).all(1)
        dropped = (out == x).flatten(1).all(1)
        assert (kept ^ dropped).all() and kept.any() and dropped.any()
        assert site.layer.calls[0] == int(kept.sum())  # one call, on the kept rows only

    def test_scale_by_keep_is_unbiased(self):
        site = LayerDrop(MaskedLayer(), p=0.5)
        x, mask, pos = _inputs(n=2000, t=1, d=4)
        with torch.no_grad():
            mean = site(x, mask, position_embeddings=pos).mean(0)
            target = site.layer(x, mask, position_embeddings=pos).mean(0)
        torch.testing.assert_close(mean, target, atol=0.05, rtol=0)

    @pytest.mark.parametrize("n", [1, 3, 40])
    def test_keep_rate(self, n):
        site = LayerDrop(MaskedLayer(), p=0.3)
        kept = 0
        trials = 4000 // n
        for _ in range(trials):
            x, _, pos = _inputs(n=n, t=1)
            with torch.no_grad():
                out = site(x, torch.ones(n, 1, 1), position_embeddings=pos)
            kept += int((out != x).flatten(1).any(1).sum())
        assert binom_pvalue(kept, trials * n, 0.7) > 1e-4

    def test_batch_mode_and_extremes(self):
        x, mask, pos = _inputs()
        layer = MaskedLayer()
        site = LayerDrop(layer, p=1.0)
        assert torch.equal(site(x, mask, position_embeddings=pos), x) and layer.calls == []
        site.p, site.mode = 0.5, "batch"
        outs = [site(x, mask, position_embeddings=pos) for _ in range(40)]
        whole = [torch.equal(o, x) for o in outs]
        assert any(whole) and not all(whole)
        assert set(layer.calls) == {16}  # never a subset in batch mode
        site.p = 0.0
        torch.testing.assert_close(site(x, mask, position_embeddings=pos), layer(x, mask, pos))

    def test_eval_is_the_layer(self):
        x, mask, pos = _inputs()
        site = LayerDrop(MaskedLayer(), p=0.9).eval()
        assert torch.equal(site(x, mask, position_embeddings=pos), site.layer(x, mask, pos))

    def test_gradients_match_the_mask_formulation(self):
        torch.manual_seed(3)
        site = LayerDrop(MaskedLayer(), p=0.5)
        x, mask, pos = _inputs()
        x.requires_grad_(True)
        state = torch.random.get_rng_state()
        out = site(x, mask, position_embeddings=pos)
        kept = ~(out == x).flatten(1).all(1)
        (out * torch.arange(1.0, 17).view(16, 1, 1)).sum().backward()
        g_site = [x.grad.clone(), site.layer.lin.weight.grad.clone()]
        x.grad, site.layer.lin.weight.grad = None, None
        torch.random.set_rng_state(state)
        full = site.layer(x, mask, pos)
        m = kept.float().view(16, 1, 1)
        ref = x + (full - x) * m * 2.0
        (ref * torch.arange(1.0, 17).view(16, 1, 1)).sum().backward()
        torch.testing.assert_close(g_site[0], x.grad)
        torch.testing.assert_close(g_site[1], site.layer.lin.weight.grad)

    def test_checkpoint_replays_the_same_draw(self):
        site = LayerDrop(MaskedLayer(), p=0.5)
        x, mask, pos = _inputs()
        x.requires_grad_(True)
        torch.manual_seed(7)
        a = site(x, mask, position_embeddings=pos)
        a.sum().backward()
        g = x.grad.clone()
        x.grad = None
        torch.manual_seed(7)
        b = checkpoint(lambda t: site(t, mask, position_embeddings=pos), x, use_reentrant=False)
        b.sum().backward()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(g, x.grad)

    def test_tuple_outputs(self):
        class TupleLayer(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, x):
                return (x + self.lin(x), "extra")

        site = LayerDrop(TupleLayer(), p=0.5)
        x = torch.randn(32, 4)
        out = site(x)
        assert isinstance(out, tuple) and out[1] == "extra" and out[0].shape == x.shape
        site.p = 1.0
        assert torch.equal(site(x)[0], x) and site(x)[1] is None

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
            LayerDrop(MaskedLayer(), p=1.5)
        with pytest.raises(TypeError, match="layer must be an nn.Module, got function"):
            LayerDrop(lambda x: x)

        class Grows(nn.Module):
            def forward(self, x):
                return torch.cat([x, x], -1)

        with pytest.raises(ValueError, match="layer output must have the shape of its input"):
            LayerDrop(Grows(), p=0.5)(torch.randn(64, 4))


def _model(n=4):
    model = nn.Module()
    model.layers = nn.ModuleList(MaskedLayer() for _ in range(n))
    return model


class TestLayerDropOnAModel:
    def test_keys_parameters_and_class_names_unchanged(self):
        model = _model()
        params = list(model.named_parameters())
        keys = list(model.state_dict())
        names = [type(m).__name__ for m in model.layers]
        rates = layer_drop(model, 0.4)
        assert rates == list(zip([f"layers.{i}" for i in range(4)], depth_rates(4, 0.4)))
        assert list(model.state_dict()) == keys
        assert all(a[1] is b[1] for a, b in zip(params, model.named_parameters()))
        assert [type(m).__name__ for m in model.layers] == names
        assert all(isinstance(m, MaskedLayer) for m in model.layers)
        plain = _model()
        plain.load_state_dict(model.state_dict(), strict=True)

    def test_eval_identical_and_sites_seen_by_schedules(self):
        model = _model()
        plain = _model()
        plain.load_state_dict(model.state_dict())
        layer_drop(model, 0.5)
        x, mask, pos = _inputs()

        def run(m):
            h = x
            for layer in m.layers:
                h = layer(h, mask, position_embeddings=pos)
            return h

        model.eval(), plain.eval()
        assert torch.equal(run(model), run(plain))
        assert [n for n, _ in drop_path_sites(model)] == [f"layers.{i}" for i in range(4)]
        assert set_drop_rates(model, 0.2, "uniform")[0] == ("layers.0", 0.2)
        assert model.layers[0].p == 0.2
        sched = DropRateScheduler(model, 0.4, time_rule="warmup", warmup_steps=2)
        sched.step()
        assert model.layers[3].p == pytest.approx(0.2)
        model.train()
        run(model).sum().backward()
        report = prune(model, 1)
        assert report["blocks_removed"] == ["layers.3"] and isinstance(
            model.layers[3], SkippedLayer
        )
        model.eval()
        assert model.layers[3](x, mask) is x

    def test_whole_model_pickles_and_copies(self):
        import copy
        import pickle

        model = _model()
        layer_drop(model, 0.4, mode="batch")
        for clone in (
            pickle.loads(pickle.dumps(model)),
            copy.deepcopy(model),
            torch.load(_saved(model), weights_only=False),
        ):
            layer = clone.layers[3]
            assert type(layer) is type(model.layers[3]) and isinstance(layer, MaskedLayer)
            assert layer.p == pytest.approx(0.4) and layer.layer_drop.mode == "batch"
            assert layer.lin.weight is not model.layers[3].lin.weight
            torch.testing.assert_close(layer.lin.weight, model.layers[3].lin.weight)

    def test_named_stack_and_errors(self):
        model = nn.Module()
        model.blocks = nn.ModuleList(MaskedLayer() for _ in range(2))
        with pytest.raises(ValueError, match="layers must name the model's layer stack"):
            layer_drop(model, 0.1)
        assert [n for n, _ in layer_drop(model, 0.1, layers="blocks")] == ["blocks.0", "blocks.1"]
        assert layer_drop(model, [0.1, 0.3], layers=model.blocks)[1] == ("blocks.1", 0.3)
        with pytest.raises(ValueError, match="rule must be one of"):
            layer_drop(model, 0.1, "cosine", layers="blocks")
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2"):
            layer_drop(model, 2, layers="blocks")
        with pytest.raises(TypeError, match="model must be a Python nn.Module, got a TorchScript"):
            layer_drop(torch.jit.script(nn.Linear(2, 2)), 0.1)
        with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
            layer_drop("model", 0.1)


class TestDepthCurves:
    def test_torchtune_formulas(self):
        import math

        n, p = 5, 0.2
        t = [i / (n - 1) for i in range(n)]
        assert depth_rates(n, p, "exp") == pytest.approx([p * (2**v - 1) for v in t])
        assert depth_rates(n, p, "log") == pytest.approx(
            [p * math.log(i + 1) / math.log(n) for i in range(n)]
        )
        assert depth_rates(n, p, "sin") == pytest.approx([p * math.sin(math.pi * v / 2) for v in t])
        assert depth_rates(n, p, "sigmoid") == pytest.approx(
            [p / (1 + math.exp(-10 * (v - 0.5))) for v in t]
        )
        assert depth_rates(n, p, "step") == [0.0, 0.0, p, p, p]
        assert depth_rates(1, p, "exp") == [p]  # torchtune: one layer alone gets the full rate
        assert depth_rates(n, p, "exp")[0] == 0.0 and depth_rates(n, p, "exp")[-1] == pytest.approx(
            p
        )


def _saved(model):
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


class StandInCache:
    """A key/value cache as Hugging Face layers use it: each layer appends its batch's rows."""

    def __init__(self):
        self.rows = {}

    def get_seq_length(self, layer_idx=0):
        return 0 if layer_idx not in self.rows else 1

    def update(self, x, layer_idx):
        self.rows[layer_idx] = x.shape[0]


class CachingLayer(nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.lin, self.layer_idx = nn.Linear(4, 4), idx

    def forward(self, x, cache=None, use_cache=False):
        if cache is not None:
            cache.update(x, self.layer_idx)
        return x + self.lin(x)


class TestCache:
    """A layer handed a key/value cache runs for every sample: the cache holds the whole batch."""

    def _model(self):
        model = nn.Module()
        model.layers = nn.ModuleList(CachingLayer(i) for i in range(4))
        layer_drop(model, 0.9, "uniform")
        return model.train()

    @pytest.mark.parametrize("how", ["positional", "keyword"])
    def test_a_cache_gets_every_sample_in_training(self, how):
        model, cache, x = self._model(), StandInCache(), torch.randn(8, 3, 4)
        with pytest.warns(UserWarning, match="given a key/value cache in training"):
            for layer in model.layers:
                x = layer(x, cache) if how == "positional" else layer(x, cache=cache)
        assert cache.rows == {0: 8, 1: 8, 2: 8, 3: 8}

    def test_use_cache_alone_runs_the_whole_layer(self):
        model, x = self._model(), torch.randn(8, 3, 4)
        calls = []
        model.layers[0].lin.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        with pytest.warns(UserWarning, match="use_cache=False"):
            model.layers[0](x, use_cache=True)
        assert calls == [8]

    def test_without_a_cache_the_layer_drops(self):
        model = self._model()
        calls = []
        model.layers[0].lin.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        torch.manual_seed(0)
        for _ in range(20):
            model.layers[0](torch.randn(8, 3, 4), use_cache=False)
        assert binom_pvalue(sum(calls), 160, 0.1) > 1e-4 and sum(calls) < 80


class TestLayerNames:
    def test_a_name_that_is_not_a_submodule(self):
        model = _model()
        with pytest.raises(
            ValueError,
            match=r"layers must name a non-empty nn.ModuleList of the model, got 'model.nope', "
            r"which names no submodule of this Module; its nn.ModuleLists are 'layers'",
        ):
            layer_drop(model, 0.2, layers="model.nope")

    def test_a_name_that_is_not_a_module_list(self):
        model = _model()
        with pytest.raises(
            ValueError, match=r"got 'layers.0', a MaskedLayer; its nn.ModuleLists are 'layers'"
        ):
            layer_drop(model, 0.2, layers="layers.0")

    def test_a_stack_of_another_model_and_a_wrong_type(self):
        with pytest.raises(ValueError, match="a ModuleList that is not part of this Module"):
            layer_drop(_model(), 0.2, layers=_model().layers)
        with pytest.raises(TypeError, match="layers must be None, a qualified name or an"):
            layer_drop(_model(), 0.2, layers=3)

    def test_a_second_call_keeps_the_profile_by_default(self):
        model = _model()
        layer_drop(model, 0.4, "exp")
        first = [layer.p for layer in model.layers]
        again = [r for _, r in layer_drop(model, 0.2)]
        assert again == pytest.approx([r / 2 for r in first])
        assert [r for _, r in layer_drop(_model(), 0.3)] == depth_rates(4, 0.3, "linspace")
