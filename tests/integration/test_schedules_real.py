"""droppath's schedules and convert on the drop-path modules of the real libraries."""

import copy

import pytest
import torch
from torch import nn

from conftest import require
from droppath import DropPath, convert, drop_path_sites, set_drop_rates


def test_real_timm():
    timm_layers = require("timm.layers")
    model = nn.Sequential(timm_layers.DropPath(0.1))
    convert(model)
    assert isinstance(model[0], DropPath) and model[0].p == 0.1


def test_real_torchvision():
    ops = require("torchvision.ops")
    model = nn.Sequential(ops.StochasticDepth(0.1, "row"))
    assert [n for n, _ in drop_path_sites(model)] == ["0"]
    convert(model)
    assert isinstance(model[0], DropPath) and model[0].p == 0.1


def test_real_transformers():
    hf = require("transformers.models.convnext.modeling_convnext")
    model = nn.Sequential(hf.ConvNextDropPath(0.1))
    assert [n for n, _ in drop_path_sites(model)] == ["0"]
    set_drop_rates(model, [0.3])
    assert model[0].drop_prob == 0.3
    convert(model)
    assert isinstance(model[0], DropPath) and model[0].p == 0.3


# --- issue 19, on real models ---------------------------------------------------------------


def _vit(p=0.2):
    timm = require("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=3,
        drop_path_rate=p,
    )


def test_a_scheduler_built_before_accelerate_drives_the_accelerated_vit():
    from droppath import DropRateScheduler, accelerate

    model = _vit()
    sched = DropRateScheduler(model, 0.3, time_rule="warmup", warmup_steps=4)
    accelerate(model)
    for _ in range(4):
        sched.step()
    in_use = {name: site.p for name, site in drop_path_sites(model)}
    scheduled = dict(zip([n for n, _ in sched.sites], sched.get_last_p()))
    assert scheduled == pytest.approx(
        {f"blocks.{b}.drop_path{i}": 0.15 * b for b in (1, 2) for i in (1, 2)}
    )
    assert {n: in_use[n] for n in scheduled} == scheduled
    assert in_use["blocks.0.drop_path1"] == in_use["blocks.0.drop_path2"] == 0.0
    # the accelerated blocks run their drop paths at these rates: a rate-1 site skips its branch
    sched.load_state_dict({**sched.state_dict(), "base_rates": [1.0] * 4})
    model.train()
    model(torch.randn(4, 3, 32, 32))  # the first training call checks each block's rewrite
    calls = []
    model.blocks[2].mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    model(torch.randn(4, 3, 32, 32))
    assert calls == []


def test_the_callbacks_log_the_rates_of_the_modules_that_run():
    from droppath import accelerate
    from droppath.integrations._common import ScheduleAtStep

    model = _vit()
    schedule = ScheduleAtStep(0.3, time_rule="warmup", warmup_steps=4)
    schedule.start(model)
    accelerate(model)  # as a LightningModule hook would, after the callback started
    logged = schedule.at(2)
    assert logged == {
        f"drop_rate/{n}": site.p
        for n, site in drop_path_sites(model)
        if not n.startswith("blocks.0")
    }
    assert logged["drop_rate/blocks.2.drop_path2"] == pytest.approx(0.15)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mixer_s16_224"])
def test_the_default_rule_keeps_the_librarys_profile(name):
    from droppath import DropRateScheduler, accelerate

    timm = require("timm")
    built = {p: timm.create_model(name, pretrained=False, drop_path_rate=p) for p in (0.1, 0.2)}
    reference = {n: float(getattr(s, "drop_prob", 0.0)) for n, s in drop_path_sites(built[0.2])}
    top = max(reference.values())
    for call in ("set_drop_rates", "accelerate", "DropRateScheduler"):
        model = copy.deepcopy(built[0.1])
        if call == "set_drop_rates":
            set_drop_rates(model, top)
        elif call == "accelerate":
            accelerate(model, top)
        else:
            DropRateScheduler(model, top)
        got = {
            n: float(getattr(s, "drop_prob", getattr(s, "p", 0.0)))
            for n, s in drop_path_sites(model)
        }
        for site, rate in reference.items():
            assert got[site] == pytest.approx(rate, abs=1e-7), (call, site)


def test_a_feature_extractor_is_refused_with_what_to_do():
    from droppath import DropRateScheduler, accelerate

    require("torchvision")
    from timm.models._features_fx import create_feature_extractor

    traced = create_feature_extractor(_vit(), return_nodes=["blocks.2"])
    for call in (
        lambda: accelerate(traced),
        lambda: set_drop_rates(traced, 0.2),
        lambda: DropRateScheduler(traced, 0.2),
        lambda: convert(traced),
    ):
        with pytest.raises(TypeError, match="GraphModule.*on the model before tracing it"):
            call()


def test_a_model_without_drop_path_is_not_a_silent_no_op():
    from droppath import DropRateScheduler, accelerate

    tv = require("torchvision.models")
    model = tv.resnet18()  # torchvision's ResNet has no stochastic depth
    with pytest.raises(ValueError, match="p=0.2 reaches no drop-path site.*this ResNet"):
        accelerate(model, 0.2)
    with pytest.raises(ValueError, match="p=0.2 reaches no drop-path site"):
        DropRateScheduler(model, 0.2)
    with pytest.warns(UserWarning, match="accelerate found nothing to act on in this ResNet"):
        accelerate(model)


def test_prune_on_an_accelerated_vit_says_what_can_be_pruned():
    from droppath import accelerate, prune

    model = _vit()
    accelerate(model)
    with pytest.raises(
        ValueError, match="prune removes only droppath Residual blocks and layer-drop"
    ):
        prune(model, 1)


def test_rates_are_checked_when_set_on_an_accelerated_site():
    from droppath import accelerate

    model = _vit()
    accelerate(model)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2.0"):
        model.blocks[1].drop_path1.p = 2.0
