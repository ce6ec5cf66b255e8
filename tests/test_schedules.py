"""Tests of droppath.schedules: depth rules, time rules, foreign modules, pruning."""

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

# --- Local stand-ins with the same class names and attributes as the real libraries' modules ---


class TimmDropPath(nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        return x


TimmDropPath.__name__ = "DropPath"  # timm.layers.DropPath


class StochasticDepth(nn.Module):  # torchvision.ops.StochasticDepth
    def __init__(self, p, mode):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return x


class ConvNextDropPath(nn.Module):  # transformers' *DropPath
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


def mixed_model():
    return nn.Sequential(
        Residual(nn.Linear(4, 4)),
        nn.Sequential(nn.Linear(4, 4), TimmDropPath(0.1)),
        StochasticDepth(0.2, "batch"),
        nn.ReLU(),
        ConvNextDropPath(0.3),
        DropPath(0.4),
    )


class TestDepthRates:
    def test_linear_is_the_papers_rule(self):
        assert depth_rates(4, 0.5, "linear") == [0.125, 0.25, 0.375, 0.5]
        assert depth_rates(1, 0.5, "linear") == [0.5]

    def test_linspace_matches_torch_linspace(self):
        assert depth_rates(5, 0.4, "linspace") == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
        assert depth_rates(12, 0.1, "linspace") == pytest.approx(
            torch.linspace(0, 0.1, 12, dtype=torch.float64).tolist()
        )
        assert depth_rates(1, 0.3, "linspace") == [0.0]

    def test_uniform_and_empty(self):
        assert depth_rates(3, 0.2, "uniform") == [0.2, 0.2, 0.2]
        assert depth_rates(0, 0.2) == []

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
            depth_rates(-1, 0.1)
        with pytest.raises(TypeError, match="n must be an int, got 2.5"):
            depth_rates(2.5, 0.1)
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2"):
            depth_rates(3, 2)
        with pytest.raises(ValueError, match="rule must be one of 'model', 'linear', 'linspace'"):
            depth_rates(3, 0.1, "cosine")

    def test_meta_device_model(self):
        with torch.device("meta"):
            model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(3)])
        assert [r for _, r in set_drop_rates(model, 0.3, "linear")] == pytest.approx(
            [0.1, 0.2, 0.3]
        )


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


def _model(n=4):
    return nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(n)])


class TestScheduler:
    def test_constant(self):
        s = DropRateScheduler(_model(), 0.4, depth_rule="linear")
        for _ in range(3):
            s.step()
        assert s.get_last_p() == [0.1, 0.2, 0.30000000000000004, 0.4]

    def test_warmup(self):
        m = _model(2)
        s = DropRateScheduler(m, 0.4, depth_rule="linear", time_rule="warmup", warmup_steps=4)
        seen = [s.get_last_p()]
        for _ in range(5):
            s.step()
            seen.append(s.get_last_p())
        assert seen == [
            [0.0, 0.0],
            [0.05, 0.1],
            [0.1, 0.2],
            [0.15000000000000002, 0.30000000000000004],
            [0.2, 0.4],
            [0.2, 0.4],
        ]
        assert m[1].p == 0.4

    def test_early_linear_and_constant(self):
        s = DropRateScheduler(_model(1), 0.5, depth_rule="linear", time_rule="early", cutoff_step=4)
        got = [s.rates_at(t)[0] for t in range(6)]
        assert got == [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
        s = DropRateScheduler(
            _model(1), 0.5, depth_rule="linear", time_rule="early", cutoff_step=2, shape="constant"
        )
        assert [s.rates_at(t)[0] for t in range(4)] == [0.5, 0.5, 0.0, 0.0]

    def test_late(self):
        s = DropRateScheduler(_model(1), 0.5, depth_rule="linear", time_rule="late", cutoff_step=2)
        assert [s.rates_at(t)[0] for t in range(4)] == [0.0, 0.0, 0.5, 0.5]

    def test_pld_matches_the_paper(self):
        theta_bar, gamma, n = 0.5, 0.01, 4
        s = DropRateScheduler(
            _model(n),
            1 - theta_bar,
            depth_rule="linear",
            time_rule="pld",
            theta_bar=theta_bar,
            gamma=gamma,
        )
        import math

        for t in (0, 1, 10, 100, 1000):
            theta = (1 - theta_bar) * math.exp(-gamma * t) + theta_bar
            keep = [1 - (i / n) * (1 - theta) for i in range(1, n + 1)]
            assert [1 - r for r in s.rates_at(t)] == pytest.approx(keep, abs=1e-12)
        assert s.rates_at(0) == [0.0] * n

    def test_state_dict_round_trip_mid_schedule(self):
        m1 = _model()
        s1 = DropRateScheduler(m1, 0.4, time_rule="warmup", warmup_steps=10)
        for _ in range(3):
            s1.step()
        state = s1.state_dict()
        m2 = _model()
        s2 = DropRateScheduler(m2, 0.4, time_rule="warmup", warmup_steps=10)
        s2.load_state_dict(state)
        assert s2.get_last_p() == s1.get_last_p() and m2[3].p == m1[3].p
        for _ in range(4):
            s1.step()
            s2.step()
            assert s2.get_last_p() == s1.get_last_p()

    def test_state_dict_is_plain_data(self, tmp_path):
        s = DropRateScheduler(_model(), 0.4, time_rule="early", cutoff_step=5)
        torch.save(s.state_dict(), tmp_path / "s.pt")
        assert torch.load(tmp_path / "s.pt", weights_only=True) == s.state_dict()

    def test_bad_options(self):
        m = _model()
        with pytest.raises(ValueError, match="time_rule='warmup' needs the option"):
            DropRateScheduler(m, 0.1, time_rule="warmup")
        with pytest.raises(ValueError, match="takes the options warmup_steps, got unknown option"):
            DropRateScheduler(m, 0.1, time_rule="warmup", warmup_steps=3, cutoff_step=2)
        with pytest.raises(ValueError, match="takes the options none, got unknown option"):
            DropRateScheduler(m, 0.1, warmup_steps=3)
        with pytest.raises(ValueError, match="time_rule must be one of 'constant', 'warmup'"):
            DropRateScheduler(m, 0.1, time_rule="cosine")
        with pytest.raises(ValueError, match="gamma must be a number > 0, got -1"):
            DropRateScheduler(m, 0.1, time_rule="pld", theta_bar=0.5, gamma=-1)
        with pytest.raises(ValueError, match=r"theta_bar must be a probability in \[0, 1\)"):
            DropRateScheduler(m, 0.1, time_rule="pld", theta_bar=1.0, gamma=0.1)
        with pytest.raises(ValueError, match="cutoff_step must be <= total_steps"):
            DropRateScheduler(m, 0.1, time_rule="late", cutoff_step=20, total_steps=10)
        with pytest.raises(ValueError, match="shape must be one of 'linear', 'constant'"):
            DropRateScheduler(m, 0.1, time_rule="early", cutoff_step=2, shape="cosine")

    def test_compiled_model_does_not_recompile_every_step(self):
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        frames = []

        def backend(gm, example_inputs):
            frames.append(gm)
            return gm.forward

        model = nn.Sequential(
            *[nn.Sequential(nn.Linear(8, 8), DropPath()) for _ in range(3)],
            *[Residual(nn.Linear(8, 8)) for _ in range(3)],
        )
        compiled = torch.compile(model, backend=backend)
        sched = DropRateScheduler(model, 0.5, time_rule="warmup", warmup_steps=50)
        for _ in range(50):
            compiled(torch.randn(16, 8)).sum().backward()
            sched.step()
        assert counters["stats"]["unique_graphs"] <= 15, dict(counters["stats"])
        assert len(frames) <= 15


class TestPrune:
    def test_removes_highest_rates_and_keeps_shortcut_path(self):
        torch.manual_seed(0)
        blocks = [Residual(nn.Linear(4, 4), shortcut=nn.Linear(4, 4, bias=False)) for _ in range(2)]
        blocks += [Residual(nn.Linear(4, 4)) for _ in range(2)]
        model = nn.Sequential(blocks[2], blocks[0], blocks[3], blocks[1]).eval()
        set_drop_rates(model, [0.1, 0.9, 0.2, 0.8])
        x = torch.randn(5, 4)
        # blocks 1 and 3 (rates 0.9 and 0.8) become their shortcuts alone
        with torch.no_grad():
            expected = blocks[1].shortcut(model[2](blocks[0].shortcut(model[0](x))))
            assert not torch.allclose(model(x), expected)  # the check below can fail
        report = prune(model, 2)
        assert report["blocks_removed"] == ["1", "3"]
        assert report["parameters_removed"] == 2 * 20  # the two branches; shortcuts stay
        assert report["parameters_left"] == 2 * 20 + 2 * 16
        assert model[1] is blocks[0].shortcut and model[3] is blocks[1].shortcut
        torch.testing.assert_close(model(x), expected)

    def test_bad_k(self):
        with pytest.raises(ValueError, match=r"k must be in \[0, 4\] for this model, got 5"):
            prune(_model(), 5)
        assert prune(_model(), 0)["blocks_removed"] == []


# --- issue 19: schedules that follow module swaps, one default depth rule, no silent no-ops ---


class TimmBlock(nn.Module):
    """A timm-style block: the library puts its DropPath in the slot only for a rate above 0."""

    def __init__(self, p=0.0):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = TimmDropPath(p) if p > 0 else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.fc(x))


def _timm_style(rates=(0.0, 0.1, 0.2, 0.3)):
    return nn.Sequential(*[TimmBlock(p) for p in rates])


def _rates_in_use(model):
    from droppath.schedules import _rate

    return {name: _rate(site) for name, site in drop_path_sites(model)}


class TestSchedulerFollowsTheModel:
    @pytest.mark.parametrize("swap", ["convert", "accelerate"])
    def test_built_before_the_swap_it_drives_the_modules_that_run(self, swap):
        from droppath import accelerate

        model = _timm_style()
        sched = DropRateScheduler(model, 0.6, time_rule="warmup", warmup_steps=4)
        convert(model) if swap == "convert" else accelerate(model)
        assert all(isinstance(m, DropPath) for _, m in drop_path_sites(model))
        for _ in range(4):
            sched.step()
        in_use = _rates_in_use(model)
        scheduled = dict(zip([n for n, _ in sched.sites], sched.get_last_p()))
        assert scheduled == pytest.approx(
            {"1.drop_path": 0.2, "2.drop_path": 0.4, "3.drop_path": 0.6}
        )
        assert {n: in_use[n] for n in scheduled} == scheduled
        assert all(in_use[n] == 0.0 for n in in_use if n not in scheduled)  # block 0: rate 0
        assert all(sched.sites[i][1] is model[i + 1].drop_path for i in range(3))

    def test_the_callbacks_log_the_rates_in_use(self):
        from droppath.integrations._common import ScheduleAtStep

        model = _timm_style()
        schedule = ScheduleAtStep(0.6, time_rule="warmup", warmup_steps=4)
        schedule.start(model)
        convert(model)  # e.g. in the LightningModule's own on_fit_start, after the callback's
        logged = schedule.at(2)
        in_use = _rates_in_use(model)
        assert logged == {
            f"drop_rate/{n}": in_use[n] for n in ("1.drop_path", "2.drop_path", "3.drop_path")
        }
        assert logged["drop_rate/3.drop_path"] == pytest.approx(0.3)

    def test_a_second_start_keeps_the_profile_it_read_first(self):
        from droppath.integrations._common import ScheduleAtStep

        model = _timm_style((0.1, 0.1, 0.1))  # a uniform profile (CaiT, MLP-Mixer, ...)
        schedule = ScheduleAtStep(0.4, time_rule="early", cutoff_step=2)
        first = schedule.start(model)
        schedule.at(3)  # past the cutoff: the model's rates are all 0 now
        assert set(_rates_in_use(model).values()) == {0.0}
        assert schedule.start(model) is first  # another fit() on the same model
        assert schedule.at(0) == {f"drop_rate/{i}.drop_path": 0.4 for i in range(3)}

    def test_a_site_that_is_gone_is_an_error_that_names_it(self):
        model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(3)])
        sched = DropRateScheduler(model, 0.3)
        prune(model, 1)
        with pytest.raises(
            RuntimeError, match="drop-path site '2' of the scheduled Sequential is gone"
        ):
            sched.step()


class TestModelRule:
    def test_default_keeps_the_profile_the_model_was_built_with(self):
        efficientnet = [0.2 * i / 4 for i in range(4)]  # p * l / n: 0.0, 0.05, 0.1, 0.15
        model = _timm_style(efficientnet)
        got = dict(set_drop_rates(model, 0.3))
        assert got == pytest.approx({"1.drop_path": 0.1, "2.drop_path": 0.2, "3.drop_path": 0.3})
        assert isinstance(model[0].drop_path, nn.Identity)  # rate 0 in the profile: stays empty
        uniform = _timm_style((0.1, 0.1, 0.1))
        assert [r for _, r in set_drop_rates(uniform, 0.25)] == [0.25, 0.25, 0.25]

    def test_the_same_p_at_the_models_maximum_changes_nothing(self):
        rates = (0.0, 0.1, 0.2, 0.30000000000000004)
        model = _timm_style(rates)
        assert [r for _, r in set_drop_rates(model, rates[-1])] == list(rates[1:])

    def test_a_model_built_with_rate_0_gets_linspace(self):
        model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(5)])
        assert [r for _, r in set_drop_rates(model, 0.4)] == depth_rates(5, 0.4, "linspace")
        slots = _timm_style((0.0, 0.0, 0.0))
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
        built = [_timm_style([0.2 * i / 4 for i in range(4)]) for _ in range(3)]
        by_accelerate = [r.rate for r in accelerate(built[0], 0.3)]
        by_set = [r for _, r in set_drop_rates(built[1], 0.3)]
        by_scheduler = DropRateScheduler(built[2], 0.3).get_last_p()
        assert by_accelerate[1:] == by_set == by_scheduler  # accelerate also fills block 0's slot
        assert by_accelerate[0] == 0.0

    def test_the_scheduler_reads_the_profile_once(self):
        model = _timm_style((0.0, 0.1, 0.2))
        sched = DropRateScheduler(model, 0.4, time_rule="warmup", warmup_steps=2)
        assert sched.get_last_p() == [0.0, 0.0]  # step 0 of the warm-up: every rate 0 now
        sched.step(), sched.step()
        assert sched.get_last_p() == pytest.approx([0.2, 0.4])
        assert sched.base_rates == pytest.approx([0.2, 0.4])

    def test_bad_profile(self):
        with pytest.raises(ValueError, match="profile must be a sequence of one rate per block"):
            depth_rates(3, 0.1, profile=[0.1])
        with pytest.raises(ValueError, match=r"profile\[1\] must be a probability"):
            depth_rates(2, 0.1, profile=[0.1, 1.5])


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
            DropRateScheduler(_model(), 0.1, depth_rule="cubic")

    def test_a_model_with_only_empty_slots_is_not_a_no_op(self):
        import warnings

        model = _timm_style((0.0, 0.0))
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

    def test_prune_says_what_can_be_pruned(self):
        model = _timm_style()
        with pytest.raises(
            ValueError,
            match=r"k must be 0 for this Sequential, got 1: prune removes only droppath Residual "
            r"blocks and layer-drop layers \(layer_drop\), and it has neither \(it has drop-path "
            r"modules \(DropPath\) inside its blocks\)",
        ):
            prune(model, 1)
        with pytest.raises(ValueError, match=r"it has neither \(it has none\)"):
            prune(nn.Linear(2, 2), 1)
        with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
            prune("model", 1)
