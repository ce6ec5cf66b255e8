"""Layer drop on real Hugging Face causal LMs (tiny configs, random weights, no downloads)."""

import os
import warnings

import pytest
import torch
from real_models import tiny_gpt2, tiny_llama

from conftest import binom_pvalue, require, run_two_processes
from droppath import DropRateScheduler, layer_drop, prune, set_drop_rates


# The models train with use_cache=False, as layer_drop's docs say: a layer handed a key/value cache
# runs for every sample. The tests of that pass use_cache=True.
def _pair(make):
    model, plain = make(), make()
    plain.load_state_dict(model.state_dict())
    return model, plain


def _batch(n=8, t=12, left_pad=True):
    ids = torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(n, t, dtype=torch.long)
    if left_pad:  # left padding: a wrong slice of the mask or positions changes the result
        for i in range(0, n, 2):
            mask[i, : 2 + i % 5] = 0
            ids[i, : 2 + i % 5] = 0
    return ids, mask


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["no-padding", "left-padding"])
def test_eval_bit_identical_and_p0_train_identical(make, left_pad):
    model, plain = _pair(make)
    keys, params = list(model.state_dict()), list(model.named_parameters())
    layer_drop(model, 0.5)
    assert list(model.state_dict()) == keys
    assert all(a[1] is b[1] for a, b in zip(params, model.named_parameters()))
    ids, mask = _batch(left_pad=left_pad)
    model.eval(), plain.eval()
    assert torch.equal(
        model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    )
    set_drop_rates(model, 0.0)
    model.train(), plain.train()
    assert torch.equal(
        model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits
    )


def test_llama_keep_rate_per_layer():
    model = tiny_llama()
    layer_drop(model, 0.3, "uniform")
    seen = {i: [] for i in range(4)}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen[i].append(kw["hidden_states"].shape[0]), with_kwargs=True
        )
    ids, mask = _batch(n=32)
    model.train()
    with torch.no_grad():
        for _ in range(15):
            model(ids, attention_mask=mask)
    for i in range(4):
        ran = sum(seen[i])
        assert binom_pvalue(ran, 15 * 32, 0.7) > 1e-4, (i, ran)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_kept_rows_equal_the_layer_on_their_rows_with_left_padding(make):
    # Layer drop only on one layer, without rescaling: each row of the logits is either the plain
    # model's (its layer kept: run on the kept rows, with their masks and positions) or the model
    # without that layer (dropped).
    model, plain = _pair(make)
    n_layers = len(model.model.layers) if hasattr(model, "model") else len(model.transformer.h)
    rates = [0.0] * n_layers
    rates[1] = 0.5
    layer_drop(model, rates, scale_by_keep=False)
    ids, mask = _batch(n=16)
    model.train(), plain.train()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        full = plain(ids, attention_mask=mask).logits
        stack = plain.model.layers if hasattr(plain, "model") else plain.transformer.h
        removed = stack[1]
        stack[1] = SkipStub()
        without = plain(ids, attention_mask=mask).logits
        stack[1] = removed
    valid = mask.bool()
    kept = torch.tensor(
        [torch.allclose(out[i][valid[i]], full[i][valid[i]], atol=1e-5) for i in range(16)]
    )
    dropped = torch.tensor(
        [torch.allclose(out[i][valid[i]], without[i][valid[i]], atol=1e-5) for i in range(16)]
    )
    assert (kept ^ dropped).all() and kept.any() and dropped.any(), (kept, dropped)


class SkipStub(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_generate_after_training_matches_plain():
    model, plain = _pair(tiny_llama)
    layer_drop(model, 0.5)
    ids, mask = _batch(n=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        loss = model(ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad(), loss.backward(), opt.step()
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), plain.generate(ids, **kw))


def test_save_pretrained_reloads_into_a_plain_model(tmp_path):
    tf = require("transformers")
    model = tiny_llama()
    layer_drop(model, 0.3)
    model.save_pretrained(tmp_path)
    plain = tf.LlamaForCausalLM.from_pretrained(tmp_path)
    assert type(plain.model.layers[0]) is not type(model.model.layers[0])
    for (k, a), (k2, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    again = tiny_llama(seed=5)
    layer_drop(again, 0.3)
    again.load_state_dict(plain.state_dict(), strict=True)


def _train_step_grads(model, ids, mask, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_gradient_checkpointing_replays_the_same_drops():
    model = tiny_llama()
    layer_drop(model, 0.5)
    model.train()
    ids, mask = _batch()
    plain_grads = _train_step_grads(model, ids, mask, seed=3)
    model.gradient_checkpointing_enable()
    ckpt_grads = _train_step_grads(model, ids, mask, seed=3)
    assert len(plain_grads) == len(ckpt_grads)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b)


def test_autocast_bf16_and_compile():
    model = tiny_llama()
    layer_drop(model, 0.5)
    model.train()
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    for _ in range(3):
        loss = compiled(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)


def test_schedules_and_prune_see_the_layers():
    model = tiny_llama()
    layer_drop(model, 0.4)
    sched = DropRateScheduler(model, 0.5, time_rule="pld", theta_bar=0.5, gamma=0.1)
    assert len(sched.sites) == 4 and sched.sites[0][0] == "model.layers.0"
    model.train()
    ids, mask = _batch()
    for _ in range(3):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        sched.step()
    assert model.model.layers[3].p == sched.get_last_p()[3] > 0
    report = prune(model, 1)
    assert report["blocks_removed"] == ["model.layers.3"]
    model.eval()
    assert model(ids, attention_mask=mask).logits.shape == (8, 12, 128)


def test_short_finetune_loss_decreases():
    # A bundled text: the Zen of Python, shipped with every Python, character-level tokens.
    import codecs
    import this

    text = codecs.decode(this.s, "rot13").encode("ascii", "ignore")
    data = torch.tensor(list(text)) % 128
    model = tiny_llama()
    layer_drop(model, 0.2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(data) - 33, (16,), generator=g)
        batch = torch.stack([data[s : s + 32] for s in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def _layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_in_train_mode_is_the_plain_models(make):
    model, plain = _pair(lambda: make(use_cache=True))
    layer_drop(model, 0.5)
    model.train(), plain.train()  # no dropout in these configs: train mode is deterministic
    ids, mask = _batch(n=6)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with pytest.warns(UserWarning, match="given a key/value cache in training"):
        got = model.generate(ids, **kw)
    assert torch.equal(got, plain.generate(ids, **kw))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_a_training_forward_with_a_cache_fills_it_for_the_whole_batch(make):
    model = make(use_cache=True)
    layer_drop(model, 0.9, "uniform")
    model.train()
    ids, mask = _batch(n=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, attention_mask=mask, use_cache=True)
    assert [layer.keys.shape[0] for layer in out.cache.layers] == [6] * len(_layers(model))
    assert any("use_cache=False" in str(w.message) for w in caught)  # said once, not silently
    calls = []  # and without the cache, the layers drop
    _layers(model)[-1].mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    for _ in range(5):
        model(ids, attention_mask=mask, use_cache=False)
    assert sum(calls) < 15


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_prune_then_save_pretrained_reloads_the_pruned_model(tmp_path, arch):
    tf = require("transformers")
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=64, pad_token_id=0
        )
        model = tf.GPT2LMHeadModel(cfg)
    else:  # a per-layer list in the config: layer_types
        cfg = tf.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=4, max_window_layers=2
        )
        model = tf.Qwen2ForCausalLM(cfg)
    types = getattr(model.config, "layer_types", None)
    layer_drop(model, [0.1, 0.5, 0.2, 0.4])
    stack, name = _layers(model), "transformer.h" if arch == "gpt2" else "model.layers"
    kept = [stack[i] for i in (0, 2)]
    report = prune(model, 2)
    assert report["blocks_removed"] == [f"{name}.1", f"{name}.3"]
    assert list(stack) == kept and model.config.num_hidden_layers == 2
    indices = [
        {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        for layer in stack
    ]
    assert indices == [{0}, {1}]  # the key/value cache's layer indices, renumbered
    if types is not None:
        assert model.config.layer_types == [types[0], types[2]]
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert len(_layers(loaded)) == 2
    model.eval(), loaded.eval()
    ids, mask = _batch(n=4)
    with torch.no_grad():
        assert torch.equal(
            model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits
        )
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), loaded.generate(ids, **kw))


def test_layer_names_are_checked_on_a_real_model():
    model = tiny_llama()
    with pytest.raises(
        ValueError,
        match=r"got 'model.nope', which names no submodule of this LlamaForCausalLM; its "
        r"nn.ModuleLists are 'model.layers'",
    ):
        layer_drop(model, 0.2, layers="model.nope")


def test_bad_model():
    with pytest.raises(ValueError, match="layers must name the model's layer stack"):
        layer_drop(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.1)


def _ddp_worker(rank, world, port, mode, result_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_llama()
        layer_drop(model, 0.5, mode=mode)
        torch.manual_seed(0)
        wrapped = DistributedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        ids, mask = _batch(n=4)
        for _ in range(4):
            loss = wrapped((ids + rank) % 128, attention_mask=mask, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # see tests/test_residual.py: gloo's teardown can deadlock in torch 2.13


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_ddp_two_processes(tmp_path, mode):
    require("transformers")  # here, not only in the workers: a skip there is a failure here
    run_two_processes(_ddp_worker, (mode, str(tmp_path)))
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert any(not torch.equal(s0[k], v) for k, v in tiny_llama().state_dict().items())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_configs_with_use_cache_drop_layers_in_training(make):
    """Issue 27, item 3: every pretrained config says use_cache=True; a training forward given
    no cache still drops samples (transformers would build a cache and hand it to every layer),
    and says nothing; a cache the caller asks for still runs whole."""
    model = make(use_cache=True)
    assert model.config.use_cache
    layer_drop(model, 0.5, "uniform")
    model.train()
    ids, mask = _batch(n=8)
    calls = []
    _layers(model)[-1].mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "given a key/value cache" warning
        for _ in range(6):
            model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert sum(calls) < 6 * 8 * 0.8, calls  # p = 0.5: about half of the rows run
    calls.clear()
    with pytest.warns(UserWarning, match="given a key/value cache in training"):
        out = model(ids, attention_mask=mask, use_cache=True)
    assert calls == [8] and out.past_key_values is not None
