"""The engine (``droppath._engine``): the settings object checked once, the one skipping step
that every site takes, and the class swap of ``droppath._swap``. The behaviour of the public
modules and functions is tested in their own files; here, how they are wired to the engine."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from torch import nn

import droppath._engine.spec as spec_module
import droppath._engine.step as step_module
from droppath import DropPath, LayerDrop, Residual, accelerate, drop_add_residual, layer_drop
from droppath._engine import DropSpec, Sum, skip_add
from droppath._swap import mixed_class, own_class, swap_class


class TestDropSpec:
    def test_defaults_and_derived_values(self):
        spec = DropSpec()
        assert (spec.p, spec.mode, spec.batch_dim, spec.scale_by_keep) == (0.0, "row", 0, True)
        assert (spec.strategy, spec.bucket) == ("auto", None)
        assert DropSpec(0.25).scale == pytest.approx(4 / 3)
        assert DropSpec(0.25, scale_by_keep=False).scale == 1.0
        assert DropSpec(1.0).scale == 1.0  # nothing is kept: no division by 0
        p = DropSpec(1)  # a valid rate is stored as a float
        assert p.p == 1.0 and type(p.p) is float

    def test_the_mask_or_skip_choice(self):
        assert DropSpec().skips and DropSpec(strategy="subset").skips
        assert not DropSpec(strategy="mask").skips
        assert DropSpec(mode="batch", strategy="mask").skips  # batch mode always skips

    @pytest.mark.parametrize(
        "field, value, error, message",
        [
            ("p", 1.5, ValueError, r"p must be a probability in \[0, 1\], got 1.5"),
            ("p", "0.1", TypeError, r"p must be a probability in \[0, 1\], got '0.1' of type"),
            ("p", True, TypeError, "p must be a probability"),
            ("mode", "rows", ValueError, "mode must be one of 'row', 'batch', got 'rows'"),
            ("batch_dim", 0.5, TypeError, "batch_dim must be an int, got 0.5"),
            ("scale_by_keep", 1, TypeError, "scale_by_keep must be True or False, got 1"),
            ("strategy", "fast", ValueError, "strategy must be one of 'auto', 'subset', 'mask'"),
            ("bucket", 0, ValueError, r"bucket must be None or an int >= 1, got 0"),
        ],
    )
    def test_bad_values_raise_when_built_with_the_entry_points_messages(
        self, field, value, error, message
    ):
        with pytest.raises(error, match=message):
            DropSpec(**{field: value})
        with pytest.raises(error, match=message):  # a changed copy is checked again
            dataclasses.replace(DropSpec(0.1), **{field: value})

    def test_frozen(self):
        spec = DropSpec(0.1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.p = 0.5
        assert dataclasses.replace(spec, p=0.5).p == 0.5 and spec.p == 0.1


def _count_checks(monkeypatch):
    """Count the checks of ``p`` that DropSpec makes."""
    calls = []
    check = spec_module.check_probability

    def counting(p, name="p"):
        calls.append(p)
        return check(p, name)

    monkeypatch.setattr(spec_module, "check_probability", counting)
    return calls


MODULES = {
    "DropPath": lambda: DropPath(0.3),
    "Residual": lambda: Residual(nn.Linear(4, 4), 0.3),
    "LayerDrop": lambda: LayerDrop(nn.Linear(4, 4), 0.3),
}


@pytest.mark.parametrize("kind", MODULES)
class TestModulesHoldASpec:
    def test_built_once_rebuilt_at_assignment_never_per_step(self, kind, monkeypatch):
        expected = DropSpec(0.3)
        calls = _count_checks(monkeypatch)
        m = MODULES[kind]()
        assert calls == [0.3] and m.spec == expected
        x = torch.randn(8, 4)
        for _ in range(5):
            m(x)
        assert calls == [0.3]  # training steps read the spec; they do not check it again
        m.p = 0.5
        assert calls == [0.3, 0.5] and m.spec.p == 0.5 and m.p == 0.5
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2"):
            m.p = 2.0
        assert m.spec.p == 0.5 and m.p == 0.5  # a refused value changes nothing
        with pytest.raises(AttributeError):
            m.spec = DropSpec()  # read-only: assign the settings themselves

    def test_pickles_hold_the_settings_and_rebuild_the_spec(self, kind):
        m = MODULES[kind]()
        m.mode, m.batch_dim = "batch", -1
        assert "_spec" not in m.__getstate__() and m.__getstate__()["mode"] == "batch"
        for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert clone.spec == m.spec == DropSpec(0.3, "batch", -1)
            clone.p = 0.1
            assert clone.spec.p == 0.1 and m.spec.p == 0.3


@pytest.fixture
def steps(monkeypatch):
    """The specs of the training steps that ``skip_add`` takes, in call order."""
    seen = []
    draw = step_module.draw

    def recording(spec, n, device, generator=None, *, branch=None):
        seen.append(spec)
        return draw(spec, n, device, generator, branch=branch)

    monkeypatch.setattr(step_module, "draw", recording)
    return seen


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        return x + self.lin(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop_path = nn.Linear(4, 4), DropPath(0.3, mode="batch")

    def forward(self, x):
        return x + self.drop_path(self.fc(x))


class TestEverySiteTakesSkipAdd:
    def test_residual_and_drop_add_residual(self, steps):
        x = torch.randn(8, 4)
        Residual(nn.Linear(4, 4), 0.3, bucket=4)(x)
        drop_add_residual(x, nn.Linear(4, 4), 0.2, mode="batch")
        assert steps == [DropSpec(0.3, bucket=4), DropSpec(0.2, "batch")]

    def test_mask_strategy_and_eval_take_no_skipping_step(self, steps):
        x = torch.randn(8, 4)
        Residual(nn.Linear(4, 4), 0.3, strategy="mask")(x)
        drop_add_residual(x, nn.Linear(4, 4), 0.3, strategy="mask")
        Residual(nn.Linear(4, 4), 0.3).eval()(x)
        assert steps == []

    def test_layer_drop(self, steps):
        x = torch.randn(8, 4)
        LayerDrop(Layer(), 0.3, scale_by_keep=False)(x)
        model = nn.Module()
        model.layers = nn.ModuleList([Layer(), Layer()])
        layer_drop(model, [0.1, 0.2], mode="batch")
        for layer in model.layers:
            layer(x)
        assert steps == [
            DropSpec(0.3, scale_by_keep=False),
            DropSpec(0.1, "batch"),
            DropSpec(0.2, "batch"),
        ]

    def test_the_forwards_accelerate_derives(self, steps):
        model = nn.Sequential(Block(), Block())
        report = accelerate(model)
        assert report.counts()["batch skip"] == 2
        model(torch.randn(8, 4))  # the first call checks each derived forward
        steps.clear()
        model(torch.randn(8, 4))
        assert steps == [DropSpec(0.3, "batch")] * 2


class TestSkipAdd:
    def test_is_drop_add_residual_on_the_same_draws(self):
        x = torch.randn(16, 4)
        branch = nn.Linear(4, 4)
        spec = DropSpec(0.5)
        out = skip_add(x, branch, spec, source=torch.Generator().manual_seed(3))
        ref = drop_add_residual(x, branch, 0.5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(out, ref)

    def test_a_dropped_step_never_calls_the_branch(self):
        calls = []

        def branch(t):
            calls.append(t.shape[0])
            return t

        x = torch.randn(8, 4)
        assert skip_add(x, branch, DropSpec(1.0)) is x
        assert skip_add(x, branch, DropSpec(1.0), combine=Sum(branch_layout=True)) is x
        assert calls == []


class Loud:
    """A mixin for the swap tests."""

    def extra_repr(self):
        return "loud"


def _namespace(cls, key):
    _namespace.calls.append((cls, key))
    return {"key": key}


_namespace.calls = []


class TestSwapClass:
    def test_in_place_under_the_class_names(self):
        lin = nn.Linear(3, 3)
        weight, keys = lin.weight, list(lin.state_dict())
        made = swap_class(lin, Loud)
        assert type(lin) is made and isinstance(lin, nn.Linear) and "loud" in repr(lin)
        assert (made.__name__, made.__qualname__, made.__module__) == (
            "Linear",
            "Linear",
            "torch.nn.modules.linear",
        )
        assert lin.weight is weight and list(lin.state_dict()) == keys
        assert own_class(lin, Loud) is nn.Linear and own_class(nn.Linear(2, 2), Loud) is nn.Linear

    def test_the_class_is_made_once_per_class_and_key(self):
        _namespace.calls.clear()
        a, b, c = nn.Linear(2, 2), nn.Linear(3, 3), nn.Linear(3, 3)
        first = swap_class(a, Loud, ("x",), namespace=_namespace)
        assert swap_class(b, Loud, ("x",), namespace=_namespace) is first
        other = swap_class(c, Loud, ("y",), namespace=_namespace)
        assert other is not first and (first.key, other.key) == (("x",), ("y",))
        assert _namespace.calls == [(nn.Linear, ("x",)), (nn.Linear, ("y",))]
        assert swap_class(c, Loud, ("x",), namespace=_namespace) is first  # a new key, in place
        assert mixed_class(Loud, nn.Linear, ("x",), namespace=_namespace) is first

    def test_pickle_and_deepcopy_round_trip(self):
        model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        made = swap_class(model[0], Loud, ("k",), namespace=_namespace)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(clone[0]) is made and clone[0].key == ("k",)
            assert clone[0].weight is not model[0].weight
            torch.testing.assert_close(clone[0].weight, model[0].weight)
            x = torch.randn(3, 2)
            torch.testing.assert_close(clone(x), model(x))
