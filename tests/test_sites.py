"""Tests of droppath.sites: site detection, empty slots, set_drop_rates, convert."""

import warnings

import pytest
import torch
from torch import nn

from droppath import (
    DropPath,
    DropRateScheduler,
    Residual,
    convert,
    depth_rates,
    drop_path_sites,
    prune,
    set_drop_rates,
)
from stand_ins import ConvNextDropPath, TimmDropPath, mixed_model, residual_stack, timm_style


class TestSetDropRates:
    def test_all_kinds_of_site_in_forward_order(self):
        model = mixed_model()
        names = [n for n, _ in drop_path_sites(model)]
        assert names == ["0", "1.1", "2", "4", "5"]
        got = set_drop_rates(model, 0.5, rule="linear")
        assert got == [("0", 0.1), ("1.1", 0.2), ("2", 0.3), ("4", 0.4), ("5", 0.5)]
        assert model[0].p == 0.1 and model[1][1].drop_prob == 0.2 and model[2].p == 0.3
        assert model[4].drop_prob == 0.4 and model[5].p == 0.5

    def test_explicit_list(self):
        model = mixed_model()
        set_drop_rates(model, [0.0, 0.1, 0.2, 0.3, 0.4])
        assert model[5].p == 0.4

    def test_length_mismatch_names_both_lengths(self):
        with pytest.raises(ValueError, match="the model has 5 sites, got 2 rates"):
            set_drop_rates(mixed_model(), [0.1, 0.2])

    def test_bad_rate_in_list(self):
        with pytest.raises(ValueError, match=r"p\[1\] must be a probability"):
            set_drop_rates(mixed_model(), [0.1, 1.2, 0.1, 0.1, 0.1])


class TestConvert:
    def test_swaps_foreign_modules_only(self):
        model = mixed_model()
        residual, linear = model[0], model[1][0]
        convert(model)
        assert model[0] is residual and model[1][0] is linear
        assert isinstance(model[1][1], DropPath) and model[1][1].p == 0.1
        assert isinstance(model[2], DropPath) and model[2].mode == "batch" and model[2].p == 0.2
        assert isinstance(model[4], DropPath) and model[4].p == 0.3
        assert [n for n, _ in drop_path_sites(model)] == ["0", "1.1", "2", "4", "5"]

    def test_keeps_scale_and_training_flag(self):
        m = TimmDropPath(0.2, scale_by_keep=False).eval()
        new = convert(m)
        assert isinstance(new, DropPath) and new.scale_by_keep is False and not new.training

    def test_keeps_the_library_class_and_its_rate_attribute(self):
        """Issue 27, item 7: timm-style scripts test ``isinstance`` with the library's class and
        set ``drop_prob``; both keep working on the replacement, under the library's name."""
        import copy
        import pickle

        from stand_ins import StochasticDepth

        model = convert(mixed_model())
        timm, tv, hf = model[1][1], model[2], model[4]
        for site, cls in ((timm, TimmDropPath), (tv, StochasticDepth), (hf, ConvNextDropPath)):
            assert isinstance(site, cls) and isinstance(site, DropPath)
            assert type(site).__name__ == cls.__name__
            assert repr(site).startswith(f"{cls.__name__}(p=")  # droppath's settings shown
            assert isinstance(copy.deepcopy(site), cls)
            assert type(pickle.loads(pickle.dumps(site))) is type(site)
        assert timm.drop_prob == 0.1 and hf.drop_prob == 0.3
        timm.drop_prob = 0.0  # sets the rate the step reads
        assert timm.p == 0.0 and timm.spec.p == 0.0
        x = torch.randn(8, 4)
        assert torch.equal(timm.train()(x), x)
        with pytest.raises(ValueError, match=r"drop_prob must be a probability in \[0, 1\], got 2"):
            hf.drop_prob = 2
        assert hf.p == 0.3 and not hasattr(tv, "drop_prob")  # torchvision's rate is p already
        assert model.state_dict().keys() == mixed_model().state_dict().keys()


class TestSiteRates:
    def test_each_kind_of_site_is_read_and_set_where_its_library_keeps_the_rate(self):
        from droppath.sites import is_drop_path_site, set_site_rate, site_rate

        model = mixed_model()
        sites = [m for _, m in drop_path_sites(model)]
        assert all(is_drop_path_site(m) for m in sites)
        assert not is_drop_path_site(model[1][0]) and not is_drop_path_site(model)
        assert [site_rate(m) for m in sites] == [0.0, 0.1, 0.2, 0.3, 0.4]
        assert site_rate(ConvNextDropPath()) == 0.0  # Hugging Face's drop_prob=None
        for rate, site in zip((0.5, 0.6, 0.7, 0.8, 0.9), sites, strict=True):
            set_site_rate(site, rate)
        assert model[0].p == 0.5 and model[1][1].drop_prob == 0.6 and model[2].p == 0.7
        assert model[4].drop_prob == 0.8 and model[5].p == 0.9
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2.0"):
            set_site_rate(model[5], 2.0)  # droppath's own modules check it

    def test_resolve_site_rates_is_what_set_drop_rates_sets_and_sets_nothing(self):
        from droppath.rates import Rates
        from droppath.site_rates import resolve_site_rates
        from droppath.sites import SiteTable

        slots = timm_style((0.0, 0.0, 0.0))  # the slots where linspace drops are filled
        planned = dict(resolve_site_rates(slots, SiteTable.of(slots), Rates.of(0.4, "model")))
        assert planned == pytest.approx({"1.drop_path": 0.2, "2.drop_path": 0.4})
        assert [m.p for _, m in drop_path_sites(slots)] == [0.0, 0.0]
        model = timm_style((0.0, 0.1, 0.2, 0.3))
        before = [m.drop_prob for m in (model[i].drop_path for i in (1, 2, 3))]
        planned = resolve_site_rates(model, SiteTable.of(model), Rates.of(0.6, "model"))
        assert [m.drop_prob for m in (model[i].drop_path for i in (1, 2, 3))] == before
        assert planned == set_drop_rates(model, 0.6)

    def test_plan_rates_is_pure_and_write_rates_applies_it(self):
        """Issue 28, item 2: the plan is apart from the writing; planning changes nothing."""
        from droppath.rates import Rates
        from droppath.site_rates import plan_rates, write_rates
        from droppath.sites import SiteTable, site_rate

        model = timm_style((0.0, 0.1, 0.2, 0.3))  # block 0's slot is empty
        table = SiteTable.of(model)
        assert [n for n, _ in table.sites] == ["1.drop_path", "2.drop_path", "3.drop_path"]
        assert [n for n, _, _ in table.slots] == ["0.drop_path"]
        assert table.depth == 4 and table.positions["0.drop_path"] == 0
        plan = plan_rates(table, Rates.of(0.4, "linear"))
        assert plan.fill == ("0.drop_path",)
        assert plan.rates == pytest.approx(
            {"0.drop_path": 0.1, "1.drop_path": 0.2, "2.drop_path": 0.3, "3.drop_path": 0.4}
        )
        assert type(model[0].drop_path) is nn.Identity  # planned, not written
        assert [m.drop_prob for m in (model[i].drop_path for i in (1, 2, 3))] == [0.1, 0.2, 0.3]
        written = write_rates(model, table, plan)
        assert [n for n, _ in written] == [f"{i}.drop_path" for i in range(4)]
        assert [site_rate(m) for _, m in written] == pytest.approx([0.1, 0.2, 0.3, 0.4])
        explicit = plan_rates(SiteTable.of(model), Rates.of([0.0, 0.1, 0.2, 0.3], "model"))
        assert explicit.fill == () and list(explicit.rates.values()) == [0.0, 0.1, 0.2, 0.3]
        with pytest.raises(ValueError, match="one rate per drop-path site: the model has 4"):
            plan_rates(SiteTable.of(model), Rates.of([0.1], "model"))


class TestModelRule:
    def test_default_keeps_the_profile_the_model_was_built_with(self):
        efficientnet = [0.2 * i / 4 for i in range(4)]  # p * l / n: 0.0, 0.05, 0.1, 0.15
        model = timm_style(efficientnet)
        got = dict(set_drop_rates(model, 0.3))
        assert got == pytest.approx({"1.drop_path": 0.1, "2.drop_path": 0.2, "3.drop_path": 0.3})
        assert isinstance(model[0].drop_path, nn.Identity)  # rate 0 in the profile: stays empty
        uniform = timm_style((0.1, 0.1, 0.1))
        assert [r for _, r in set_drop_rates(uniform, 0.25)] == [0.25, 0.25, 0.25]

    def test_the_same_p_at_the_models_maximum_changes_nothing(self):
        rates = (0.0, 0.1, 0.2, 0.30000000000000004)
        model = timm_style(rates)
        assert [r for _, r in set_drop_rates(model, rates[-1])] == list(rates[1:])

    def test_a_model_built_with_rate_0_gets_linspace(self):
        model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(5)])
        assert [r for _, r in set_drop_rates(model, 0.4)] == depth_rates(5, 0.4, "linspace")
        slots = timm_style((0.0, 0.0, 0.0))
        got = dict(set_drop_rates(slots, 0.4))  # empty slots are filled where linspace drops
        assert got == pytest.approx({"1.drop_path": 0.2, "2.drop_path": 0.4})

    def test_every_entry_point_has_the_same_default(self):
        import inspect

        from droppath import accelerate, layer_drop

        defaults = {
            "depth_rates": inspect.signature(depth_rates).parameters["rule"].default,
            "set_drop_rates": inspect.signature(set_drop_rates).parameters["rule"].default,
            "accelerate": inspect.signature(accelerate).parameters["rule"].default,
            "layer_drop": inspect.signature(layer_drop).parameters["rule"].default,
            "DropRateScheduler": inspect.signature(DropRateScheduler)
            .parameters["depth_rule"]
            .default,
        }
        assert set(defaults.values()) == {"model"}, defaults
        built = [timm_style([0.2 * i / 4 for i in range(4)]) for _ in range(3)]
        by_accelerate = [r.rate for r in accelerate(built[0], 0.3)]
        by_set = [r for _, r in set_drop_rates(built[1], 0.3)]
        by_scheduler = DropRateScheduler(built[2], 0.3).get_last_p()
        assert by_accelerate[1:] == by_set == by_scheduler  # accelerate also fills block 0's slot
        assert by_accelerate[0] == 0.0


class TestNothingToActOn:
    def test_a_p_that_reaches_nothing_raises_with_what_was_searched_for(self):
        from droppath import accelerate

        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        for call in (
            lambda: set_drop_rates(model, 0.2),
            lambda: DropRateScheduler(model, 0.2),
            lambda: accelerate(model, 0.2),
        ):
            with pytest.raises(ValueError, match="p=0.2 reaches no drop-path site") as info:
                call()
            message = str(info.value)
            assert "this Sequential" in message and "timm's DropPath" in message
            assert "torchvision's StochasticDepth" in message and "drop_path*" in message

    def test_nothing_to_do_warns(self):
        from droppath import accelerate

        model = nn.Sequential(nn.Linear(4, 4))
        with pytest.warns(
            UserWarning, match="accelerate found nothing to act on in this Sequential"
        ):
            assert len(accelerate(model)) == 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            accelerate(model, 0.0)  # one warning: accelerate's, not also set_drop_rates'
        assert [str(w.message).split(":")[0] for w in caught] == [
            "accelerate found nothing to act on in this Sequential"
        ]
        with pytest.warns(UserWarning, match="set_drop_rates found nothing to act on"):
            assert set_drop_rates(model, 0.0) == []
        with pytest.warns(UserWarning, match="DropRateScheduler found nothing to act on"):
            DropRateScheduler(model, [])

    def test_bad_arguments_are_named_before_the_model_is_searched(self):
        model = nn.Sequential(nn.Linear(4, 4))
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
            set_drop_rates(model, 1.5)
        with pytest.raises(ValueError, match=r"p\[1\] must be a probability"):
            DropRateScheduler(model, [0.0, 2.0])
        with pytest.raises(ValueError, match="depth_rule must be one of 'model', 'linear'"):
            DropRateScheduler(residual_stack(), 0.1, depth_rule="cubic")

    def test_a_model_with_only_empty_slots_is_not_a_no_op(self):
        import warnings

        model = timm_style((0.0, 0.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert set_drop_rates(model, 0.2) == [("1.drop_path", 0.2)]


class TestTracedModels:
    def _traced(self):
        return torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), TimmDropPath(0.1)))

    def test_every_entry_point_refuses_a_graph_module(self):
        from droppath import accelerate, layer_drop

        gm = self._traced()
        calls = {
            "accelerate": lambda m: accelerate(m),
            "set_drop_rates": lambda m: set_drop_rates(m, 0.1),
            "DropRateScheduler": lambda m: DropRateScheduler(m, 0.1),
            "convert": convert,
            "prune": lambda m: prune(m, 0),
            "layer_drop": lambda m: layer_drop(m, 0.1),
        }
        for name, call in calls.items():
            with pytest.raises(
                TypeError,
                match=f"got a torch.fx.GraphModule.*Call {name} on the model before tracing",
            ):
                call(gm)

    def test_a_graph_module_inside_a_model_is_named(self):
        model = nn.Sequential(nn.Linear(4, 4), self._traced())
        with pytest.raises(TypeError, match="got a torch.fx.GraphModule at '1'"):
            set_drop_rates(model, 0.1)

    def test_droppath_modules_in_a_trace_follow_the_model_they_came_from(self):
        model = nn.Sequential(nn.Linear(4, 4), DropPath(0.1))
        gm = torch.fx.symbolic_trace(model)
        sched = DropRateScheduler(model, 0.3)  # on the model, before or after tracing
        assert (
            gm.get_submodule("1") is model[1] and gm.get_submodule("1").p == sched.get_last_p()[0]
        )


class TestErrorsNameTheMistake:
    def test_convert_names_model(self):
        with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
            convert(3)
