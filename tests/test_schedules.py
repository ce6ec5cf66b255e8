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
