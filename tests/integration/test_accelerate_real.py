"""``accelerate`` on real timm, torchvision and transformers models (random weights, no downloads).

What must hold for every model: names and weights unchanged, evaluation and rates of 0
bit-identical to the original, the original's distribution in training (the same output and
gradients under the same keep decisions), and the libraries' own rates reproduced by the depth
rules.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from real_models import BATCHNORM, MODELS, RULES, _hf_config, build, example, output
from torch import nn

import droppath._engine.draws as draws_module
from conftest import binom_pvalue, require, run_two_processes
from droppath import (
    DropPath,
    DropRateScheduler,
    accelerate,
    convert,
    drop_path_sites,
    prune,
    set_drop_rates,
)
from droppath.sites import fill_slots


def _lib_rates(model: nn.Module) -> dict[str, float]:
    """The rates the library set at build time, by site name."""
    rates = {}
    for name, m in model.named_modules():
        kind = type(m).__name__
        if kind.endswith("DropPath") and hasattr(m, "drop_prob"):
            rates[name] = float(m.drop_prob)
        elif kind == "StochasticDepth":
            rates[name] = float(m.p)
    return rates


@pytest.mark.parametrize("name", MODELS)
def test_depth_rules_reproduce_the_library_rates(name):
    p = 0.2
    reference = _lib_rates(build(name, p))
    model = build(name, 0.0)
    accelerate(model, p, RULES.get(name, "linspace"))
    got = {n: float(m.p) for n, m in drop_path_sites(model)}
    assert reference and set(reference) <= set(got)
    for site, rate in got.items():  # slots the library left empty have rate 0
        assert abs(rate - reference.get(site, 0.0)) <= 1e-7, site
    # set_drop_rates on the library's own modules gives the same rates
    plain = build(name, 0.0)
    set_drop_rates(plain, p, RULES.get(name, "linspace"))
    for site, rate in _lib_rates(plain).items():
        assert abs(rate - reference[site]) <= 1e-7, site


@pytest.mark.parametrize("name", MODELS)
def test_names_weights_eval_and_zero_rates_unchanged(name):
    torch.manual_seed(0)
    original = build(name, 0.1)
    model = copy.deepcopy(original)
    params = list(model.named_parameters())
    keys = list(model.state_dict())
    report = accelerate(model, 0.3)

    assert list(model.state_dict()) == keys
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in params]
    assert all(a is b for (_, a), (_, b) in zip(after, params))
    # the report: every site, row subset unless its branch holds BatchNorm
    assert [r.name for r in report] == [n for n, _ in drop_path_sites(model)]
    for row in report:
        block = model.get_submodule(row.name.rpartition(".")[0])
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())
        assert row.runs == ("mask" if has_bn else "row subset"), str(report)
        assert ("BatchNorm" in row.reason) == has_bn
    assert any(r.runs == "mask" for r in report) == (name in BATCHNORM)
    # class names unchanged
    assert [type(m).__name__ for m in model.modules()] == [
        type(m).__name__ for m in fill_and_list(original)
    ]

    x = example(name)
    original.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(output(model(x)), output(original(x)))
    # training at rates 0: the original's own forward, bit for bit (BatchNorm statistics too)
    set_drop_rates(model, 0.0)
    set_drop_rates(original, 0.0)
    original.train()
    model.train()
    torch.manual_seed(1)
    a = output(original(x))
    torch.manual_seed(1)
    b = output(model(x))
    assert torch.equal(a, b)


def fill_and_list(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` as ``accelerate`` leaves them: peers converted, slots filled."""
    model = convert(copy.deepcopy(model))
    fill_slots(model)
    return list(model.modules())


class _Replay(nn.Module):
    """A drop-path module that applies recorded keep decisions, in call order."""

    def __init__(self, log, rate):
        super().__init__()
        self.log, self.rate = log, rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        kept = self.log.pop(0)
        mask = torch.zeros(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype)
        mask[kept] = 1.0 / (1.0 - self.rate)
        return x * mask


def _record_draws(monkeypatch):
    log = []
    draw = draws_module.draw_rows

    def recording(n, keep, device, **options):
        idx, run = draw(n, keep, device, **options)
        log.append(idx.clone())
        return idx, run

    monkeypatch.setattr(draws_module, "draw_rows", recording)
    return log


def _freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm in eval mode: the branches then treat samples independently, so the subset and
    the mask compute the same values."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@pytest.mark.parametrize("name", MODELS)
def test_same_decisions_same_output_and_gradients(name, monkeypatch):
    torch.manual_seed(0)
    original = build(name, 0.0)
    model = copy.deepcopy(original)
    report = accelerate(model, 0.5, "uniform", batchnorm="subset")
    assert {r.runs for r in report} == {"row subset"}
    log = _record_draws(monkeypatch)

    # the original, every site (empty slots included) replaying the decisions
    convert(original)
    fill_slots(original)
    replay: list = []
    for site_name, _ in drop_path_sites(original):
        owner, _, attr = site_name.rpartition(".")
        setattr(original.get_submodule(owner), attr, _Replay(replay, 0.5))

    x = example(name)
    for m in (model, original):
        m.train()
        _freeze_batchnorm(m)
    y = output(model(x))
    (y.float() ** 2).mean().backward()
    assert log, "no decision was drawn"
    assert any(0 < len(k) < x.shape[0] for k in log), "no call ran a strict subset"
    replay.extend(log)
    y0 = output(original(x))
    (y0.float() ** 2).mean().backward()
    assert not replay, "the original made other calls than the accelerated model"

    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(model.named_parameters(), original.named_parameters()):
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-5, msg=n)


def _small_vit(**kwargs):
    timm = require("timm")
    return timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, **kwargs
    )


def test_keep_rate_is_one_minus_p_and_the_branch_sees_the_kept_samples(monkeypatch):
    model = _small_vit()
    accelerate(model, 0.3, "uniform")
    log = _record_draws(monkeypatch)
    seen = []
    model.blocks[1].norm2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    model.train()
    x = torch.randn(16, 3, 32, 32)
    model(x)  # the first training call checks each block's derived forward
    log.clear()
    seen.clear()
    with torch.no_grad():
        for _ in range(60):
            model(x)
    assert len(log) == 60 * 4  # 2 blocks, 2 sites each, one draw per call
    kept = sum(len(k) for k in log)
    assert binom_pvalue(kept, 60 * 4 * 16, 0.7) > 1e-4
    # the last site's branch ran on its kept samples only (a lone one beside one dropped one)
    expected = [max(2, len(k)) for k in log[3::4] if len(k) > 0]
    assert seen == expected


def test_both_modes_stay_live():
    torch.manual_seed(0)
    original = _small_vit(attn_drop_rate=0.3, proj_drop_rate=0.2, drop_path_rate=0.1)
    model = copy.deepcopy(original)
    accelerate(model, 0.4)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b)  # attention dropout and drop path are live in training
    model.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.equal(model(x), original(x))  # and off in evaluation, after training


def test_schedules_convert_and_prune_see_the_same_sites():
    model = _small_vit(drop_path_rate=0.1)
    timm_sites = [n for n, _ in drop_path_sites(model)]  # timm's DropPath modules
    filled = convert(copy.deepcopy(model))
    fill_slots(filled)
    accelerate(model)
    names = [n for n, _ in drop_path_sites(model)]
    # timm's sites keep their names; the empty slot of block 0 joins them, where it was
    assert names == [n for n, _ in drop_path_sites(filled)]
    assert set(timm_sites) < set(names)
    assert names[:2] == ["blocks.0.drop_path1", "blocks.0.drop_path2"]
    assert [n for n, _ in set_drop_rates(model, 0.2, "linspace")] == names
    sched = DropRateScheduler(model, 0.2, depth_rule="linspace", time_rule="warmup", warmup_steps=2)
    assert [n for n, _ in sched.sites] == names
    sched.step()
    assert model.blocks[1].drop_path1.p == pytest.approx(0.1)
    convert(model)
    assert [n for n, _ in drop_path_sites(model)] == names
    assert prune(model, 0)["blocks_removed"] == []
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize(
    "name", ["timm:vit_small_patch16_224", "torchvision:swin_t", "transformers:Dinov2Model"]
)
def test_library_habits_keep_working_on_converted_sites(name):
    """Issue 27, item 7: a site that accelerate converted is still an instance of the library's
    class, under its name, and the library's rate attribute (timm's and Hugging Face's
    ``drop_prob``, torchvision's ``p``) sets its rate, checked."""
    original = build(name, 0.2)
    library = {n: m for n, m in drop_path_sites(original)}
    model = copy.deepcopy(original)
    accelerate(model)
    x = example(name)
    for site_name, old in library.items():
        site = model.get_submodule(site_name)
        assert isinstance(site, type(old)) and isinstance(site, DropPath), site_name
        assert type(site).__name__ == type(old).__name__
        attr = "drop_prob" if hasattr(old, "drop_prob") else "p"
        assert getattr(site, attr) == site.p == old.__dict__[attr]
        with pytest.raises(ValueError, match=rf"{attr} must be a probability in \[0, 1\], got 1.5"):
            setattr(site, attr, 1.5)
        setattr(site, attr, 0.0)  # how timm-style scripts turn drop path off
        assert site.p == 0.0 and getattr(site, attr) == 0.0
    assert model.state_dict().keys() == original.state_dict().keys()
    copied = copy.deepcopy(model)
    assert all(isinstance(copied.get_submodule(n), type(m)) for n, m in library.items())
    # every rate 0: training computes what evaluation computes (these models have no dropout)
    with torch.no_grad():
        torch.testing.assert_close(output(model.train()(x)), output(model.eval()(x)))


def test_checkpoints_load_both_ways_and_optimizer_stays_valid():
    torch.manual_seed(0)
    plain = _small_vit(drop_path_rate=0.1)
    model = copy.deepcopy(plain)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerate(model, 0.5)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    before = model.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.head.weight)
    plain.load_state_dict(model.state_dict(), strict=True)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    # the whole model pickles (torch.save), and comes back accelerated
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.blocks[0]).__name__ == "Block"
    assert type(loaded.blocks[0]) is type(model.blocks[0])
    pickle.loads(pickle.dumps(model)).eval()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_torch_compile():
    torch.manual_seed(0)
    model = _small_vit()
    accelerate(model, 0.5)
    compiled = torch.compile(model)
    x = torch.randn(8, 3, 32, 32)
    model.train()
    for _ in range(3):
        compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_autocast_bfloat16_and_channels_last():
    torch.manual_seed(0)
    model = _small_vit()
    accelerate(model, 0.5)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(8, 3, 32, 32))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16

    timm = require("timm")
    net = timm.create_model("convnext_tiny", pretrained=False).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(net)
    accelerate(net, 0.5)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    net.train()
    net(x).sum().backward()
    net.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


def test_timm_gradient_checkpointing_replays_the_decisions():
    torch.manual_seed(0)
    model = _small_vit()
    accelerate(model, 0.5)
    twin = copy.deepcopy(model)
    twin.set_grad_checkpointing(True)
    x = torch.randn(8, 3, 32, 32)
    for m in (model, twin):
        m.train()
        torch.manual_seed(3)
        m(x).pow(2).mean().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), n
        else:
            torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_bad_input_is_named():
    model = _small_vit()
    with pytest.raises(TypeError, match="TorchScript"):
        accelerate(torch.jit.script(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        accelerate("vit")
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        accelerate(model, 1.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        accelerate(model, 0.1, "cosine")
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        accelerate(model, 0.1, batchnorm="sync")


def test_compiled_schedule_does_not_recompile_per_rate():
    counters = require("torch._dynamo.utils").counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = require("timm").create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=32, depth=6
    )
    accelerate(model, 0.5)
    sched = DropRateScheduler(
        model, 0.5, depth_rule="linspace", time_rule="warmup", warmup_steps=50
    )
    compiled = torch.compile(model)
    model.train()
    x = torch.randn(8, 3, 32, 32)
    for _ in range(4):
        compiled(x).sum().backward()
        sched.step()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(8):  # every rate changes at every step: no new graph
        compiled(x).sum().backward()
        sched.step()
    assert counters["stats"]["unique_graphs"] == graphs
    assert graphs <= 10


def _ddp_worker(rank, world, port, result_dir):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights and decisions on every rank
        model = _small_vit()
        accelerate(model, 0.7, "uniform")
        wrapped = DistributedDataParallel(model)  # default arguments
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.01)
        data = torch.Generator().manual_seed(100 + rank)
        for _ in range(6):
            loss = wrapped(torch.randn(4, 3, 32, 32, generator=data)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # see tests/test_residual.py: gloo's destructor can deadlock at teardown


def test_ddp_two_gloo_processes(tmp_path):
    require("timm")  # here, not in the workers, where a skip would be a failure
    run_two_processes(_ddp_worker, (str(tmp_path),))
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def docs_table() -> str:
    """The table of docs/models.md: ``accelerate``'s report on each model, as its library
    builds it by default (full size, random weights), with ``drop_path_rate=0.1``."""
    from real_models import build_default

    lines = [
        "| model | blocks rewritten | sites | row subset | batch skip | mask | why mask |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name in MODELS:
        report = accelerate(build_default(name, 0.1))
        rewritten = sorted({r.block for r in report if r.runs != "mask"})
        counts = report.counts()
        reasons = sorted({f"{r.block}: {r.reason}" for r in report if r.runs == "mask"})
        lines.append(
            f"| {name} | {', '.join(rewritten) or '-'} | {len(report)} | {counts['row subset']} "
            f"| {counts['batch skip']} | {counts['mask']} | {'; '.join(reasons) or '-'} |"
        )
    return "\n".join(lines)


def test_docs_table_is_the_report():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    table = docs_table()
    assert table in docs, f"docs/models.md must hold this table:\n{table}"


def test_batch_mode_sites_skip_the_whole_branch():
    torch.manual_seed(0)
    model = build("torchvision:convnext_tiny", 0.0)
    convert(model)
    for _, site in drop_path_sites(model):
        site.mode = "batch"  # torchvision's StochasticDepth(mode="batch")
    report = accelerate(model, 0.5, "uniform")
    assert report.counts() == {"row subset": 0, "batch skip": len(report), "mask": 0}
    calls = []
    blocks = [m for m in model.modules() if type(m).__name__ == "CNBlock"]
    for block in blocks:
        block.block.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    model.train()
    x = torch.randn(2, 3, 32, 32)
    model(x)  # the first training call checks each block (on one kept row beside a dropped one)
    calls.clear()
    steps = 12
    for _ in range(steps):
        model(x).sum().backward()
    assert set(calls) <= {2}  # a kept step runs the whole batch
    assert binom_pvalue(len(calls), steps * len(blocks), 0.5) > 1e-4


def test_torchvision_feature_extraction_traces_an_accelerated_model():
    fe = require("torchvision.models.feature_extraction")
    torch.manual_seed(0)
    model = build("torchvision:convnext_tiny", 0.0)
    accelerate(model, 0.3)
    train_nodes, eval_nodes = fe.get_graph_node_names(model)
    site = "features.1.0.stochastic_depth"
    assert site in train_nodes and site in eval_nodes  # the sites are nodes in both modes
    extractor = fe.create_feature_extractor(model, return_nodes={"features.3": "mid"})
    x = example("torchvision:convnext_tiny")
    extractor.eval()
    model.eval()
    with torch.no_grad():
        expected = model.features[:4](x)
        assert torch.equal(extractor(x)["mid"], expected)
    extractor.train()
    extractor(x)["mid"].sum().backward()  # the traced graph trains, on the mask


@pytest.mark.parametrize("name", ["timm:resnet18", "timm:resnet50"])
def test_resnet_blocks_train_when_every_sample_is_dropped(name):
    # the sum is then the block's input itself; timm's in-place ReLU after it must not
    # overwrite that input, which the previous block's backward needs
    model = build(name, 0.0)
    accelerate(model, 1.0, "uniform", batchnorm="subset")
    model.train()
    model(example(name)).sum().backward()
    assert model.conv1.weight.grad is not None


@pytest.mark.parametrize("name", ["Dinov2Model", "BeitModel"])
def test_attention_weights_in_training_cover_the_whole_batch(name):
    """Issue 27, item 1: output_attentions=True in training returns one tensor per layer, for
    every sample, on the first call (the check's runs are not recorded) and after it (a call
    that asks for attention weights runs every sample through the branches)."""
    tf = require("transformers")
    config = _hf_config(name, 0.5)
    config._attn_implementation = "eager"  # attention weights computed, not sdpa's
    model = getattr(tf, name)(config)
    accelerate(model, 0.5, rule="uniform")
    model.train()
    x = torch.randn(8, 3, 32, 32)
    for _ in range(3):
        out = model(pixel_values=x, output_attentions=True)
        assert len(out.attentions) == 3
        assert [a.shape[0] for a in out.attentions] == [8, 8, 8]
    out = model(pixel_values=x)  # without: the saving
    from droppath.acceleration import check_states

    assert set(check_states(model).values()) == {"verified"}
