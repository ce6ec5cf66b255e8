"""Tests of droppath.scheduler: the time rules, the scheduler, and the trainer callbacks' use
of it (droppath.integrations._common)."""

import pytest
import torch
from torch import nn

from droppath import DropPath, DropRateScheduler, Residual, convert, drop_path_sites, prune
from stand_ins import rates_in_use, residual_stack, timm_style


class TestScheduler:
    def test_constant(self):
        s = DropRateScheduler(residual_stack(), 0.4, depth_rule="linear")
        for _ in range(3):
            s.step()
        assert s.get_last_p() == [0.1, 0.2, 0.30000000000000004, 0.4]

    def test_warmup(self):
        m = residual_stack(2)
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
        s = DropRateScheduler(
            residual_stack(1), 0.5, depth_rule="linear", time_rule="early", cutoff_step=4
        )
        got = [s.rates_at(t)[0] for t in range(6)]
        assert got == [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
        s = DropRateScheduler(
            residual_stack(1),
            0.5,
            depth_rule="linear",
            time_rule="early",
            cutoff_step=2,
            shape="constant",
        )
        assert [s.rates_at(t)[0] for t in range(4)] == [0.5, 0.5, 0.0, 0.0]

    def test_late(self):
        s = DropRateScheduler(
            residual_stack(1), 0.5, depth_rule="linear", time_rule="late", cutoff_step=2
        )
        assert [s.rates_at(t)[0] for t in range(4)] == [0.0, 0.0, 0.5, 0.5]

    def test_pld_matches_the_paper(self):
        theta_bar, gamma, n = 0.5, 0.01, 4
        s = DropRateScheduler(
            residual_stack(n),
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
        m1 = residual_stack()
        s1 = DropRateScheduler(m1, 0.4, time_rule="warmup", warmup_steps=10)
        for _ in range(3):
            s1.step()
        state = s1.state_dict()
        m2 = residual_stack()
        s2 = DropRateScheduler(m2, 0.4, time_rule="warmup", warmup_steps=10)
        s2.load_state_dict(state)
        assert s2.get_last_p() == s1.get_last_p() and m2[3].p == m1[3].p
        for _ in range(4):
            s1.step()
            s2.step()
            assert s2.get_last_p() == s1.get_last_p()

    def test_state_dict_is_plain_data(self, tmp_path):
        s = DropRateScheduler(residual_stack(), 0.4, time_rule="early", cutoff_step=5)
        torch.save(s.state_dict(), tmp_path / "s.pt")
        assert torch.load(tmp_path / "s.pt", weights_only=True) == s.state_dict()

    def test_bad_options(self):
        m = residual_stack()
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

    def test_the_scheduler_reads_the_profile_once(self):
        model = timm_style((0.0, 0.1, 0.2))
        sched = DropRateScheduler(model, 0.4, time_rule="warmup", warmup_steps=2)
        assert sched.get_last_p() == [0.0, 0.0]  # step 0 of the warm-up: every rate 0 now
        sched.step(), sched.step()
        assert sched.get_last_p() == pytest.approx([0.2, 0.4])
        assert sched.base_rates == pytest.approx([0.2, 0.4])


class TestSchedulerFollowsTheModel:
    @pytest.mark.parametrize("swap", ["convert", "accelerate"])
    def test_built_before_the_swap_it_drives_the_modules_that_run(self, swap):
        from droppath import accelerate

        model = timm_style()
        sched = DropRateScheduler(model, 0.6, time_rule="warmup", warmup_steps=4)
        convert(model) if swap == "convert" else accelerate(model)
        assert all(isinstance(m, DropPath) for _, m in drop_path_sites(model))
        for _ in range(4):
            sched.step()
        in_use = rates_in_use(model)
        scheduled = dict(zip([n for n, _ in sched.sites], sched.get_last_p()))
        assert scheduled == pytest.approx(
            {"1.drop_path": 0.2, "2.drop_path": 0.4, "3.drop_path": 0.6}
        )
        assert {n: in_use[n] for n in scheduled} == scheduled
        assert all(in_use[n] == 0.0 for n in in_use if n not in scheduled)  # block 0: rate 0
        assert all(sched.sites[i][1] is model[i + 1].drop_path for i in range(3))

    def test_the_callbacks_log_the_rates_in_use(self):
        from droppath.integrations._common import ScheduleAtStep

        model = timm_style()
        schedule = ScheduleAtStep(0.6, time_rule="warmup", warmup_steps=4)
        schedule.start(model)
        convert(model)  # e.g. in the LightningModule's own on_fit_start, after the callback's
        logged = schedule.at(2)
        in_use = rates_in_use(model)
        assert logged == {
            f"drop_rate/{n}": in_use[n] for n in ("1.drop_path", "2.drop_path", "3.drop_path")
        }
        assert logged["drop_rate/3.drop_path"] == pytest.approx(0.3)

    def test_a_second_start_keeps_the_profile_it_read_first(self):
        from droppath.integrations._common import ScheduleAtStep

        model = timm_style((0.1, 0.1, 0.1))  # a uniform profile (CaiT, MLP-Mixer, ...)
        schedule = ScheduleAtStep(0.4, time_rule="early", cutoff_step=2)
        first = schedule.start(model)
        schedule.at(3)  # past the cutoff: the model's rates are all 0 now
        assert set(rates_in_use(model).values()) == {0.0}
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


class TestStepTo:
    def test_step_to_is_where_as_many_steps_lead(self):
        stepped, jumped = residual_stack(), residual_stack()
        s1 = DropRateScheduler(stepped, 0.4, time_rule="warmup", warmup_steps=10)
        s2 = DropRateScheduler(jumped, 0.4, time_rule="warmup", warmup_steps=10)
        for _ in range(7):
            s1.step()
        s2.step_to(7)
        assert s2.last_step == 7 and s2.get_last_p() == s1.get_last_p() == s1.rates_at(7)
        assert [m.p for m in jumped] == [m.p for m in stepped]
        s1.step(), s2.step()  # step() goes on from the step set
        assert s2.last_step == 8 and s2.get_last_p() == s1.get_last_p()
        s2.step_to(2)  # and back
        assert s2.get_last_p() == s2.rates_at(2) and [m.p for m in jumped] == s2.rates_at(2)

    def test_a_bad_step_changes_nothing(self):
        model = residual_stack()
        sched = DropRateScheduler(model, 0.4, time_rule="warmup", warmup_steps=10)
        sched.step_to(3)
        before = [m.p for m in model]
        with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
            sched.step_to(-1)
        with pytest.raises(TypeError, match="step must be an int, got 1.5"):
            sched.step_to(1.5)
        assert sched.last_step == 3 and [m.p for m in model] == before

    def test_the_callbacks_set_the_step_without_a_state_dict_round_trip(self, monkeypatch):
        from droppath.integrations._common import ScheduleAtStep

        def refuse(*args, **kwargs):
            raise AssertionError("the callback must not round-trip the scheduler's state")

        model = residual_stack()
        schedule = ScheduleAtStep(0.4, time_rule="warmup", warmup_steps=10)
        sched = schedule.start(model)
        monkeypatch.setattr(DropRateScheduler, "load_state_dict", refuse)
        monkeypatch.setattr(DropRateScheduler, "state_dict", refuse)
        logged = schedule.at(5)
        assert sched.last_step == 5 and sched.get_last_p() == sched.rates_at(5)
        assert list(logged.values()) == [m.p for m in model] == sched.rates_at(5)
        schedule.at(2)  # a resumed or restarted trainer's step can be lower
        assert sched.last_step == 2 and [m.p for m in model] == sched.rates_at(2)


def test_trainer_callbacks_log_sites_without_wrapper_segments():
    """Lightning's fsdp strategy wraps the model (FSDP1's ``_fsdp_wrapped_module``): the callbacks
    log each site under the name it has without the wrapper."""
    from droppath import Residual
    from droppath.integrations._common import ScheduleAtStep

    inner = nn.Sequential(nn.Linear(4, 4), Residual(nn.Linear(4, 4), p=0.2))
    model = nn.Module()
    model._fsdp_wrapped_module = inner
    schedule = ScheduleAtStep(0.2)
    schedule.start(model)
    assert list(schedule.at(0)) == ["drop_rate/1"]
