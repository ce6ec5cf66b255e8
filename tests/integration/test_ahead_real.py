"""draw_ahead on real library models (accelerated by accelerate, or language models converted by
layer_drop): under torch.compile, one graph per training forward (the hook's break before it,
none per site), the same steps as eager."""

import copy
import warnings

import pytest
import torch
from real_models import build, tiny_gpt2, tiny_llama

from conftest import require
from droppath import accelerate, draw_ahead, set_drop_rates


def _timm(name):
    timm = require("timm")
    model = timm.create_model(name, drop_path_rate=0.3, num_classes=10)
    return model, model.default_cfg["input_size"][-1]


def _hf(name):
    return build(name, 0.3), 32


MODELS = {
    "timm:test_vit": lambda: _timm("test_vit"),
    "timm:test_convnext": lambda: _timm("test_convnext"),
    "transformers:Dinov2Model": lambda: _hf("transformers:Dinov2Model"),
    "transformers:SwinModel": lambda: _hf("transformers:SwinModel"),
}


def _loss(out):
    out = getattr(out, "last_hidden_state", out)
    return out.float().square().mean()


class _Counting:
    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd

        self.calls = self.compiled = 0
        self._aot = aot_autograd(fw_compiler=self._plain, bw_compiler=self._plain)

    @staticmethod
    def _plain(gm, example_inputs):
        from functorch.compile import make_boxed_func

        return make_boxed_func(gm.forward)

    def __call__(self, gm, example_inputs):
        self.compiled += 1
        run = self._aot(gm, example_inputs)

        def counted(*args):
            self.calls += 1
            return run(*args)

        return counted


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_accelerated_model_is_one_graph_per_forward(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, size = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = accelerate(model)
    assert len(report) and not report.counts()["mask"], str(report)
    reference = copy.deepcopy(model)
    draw_ahead(model)
    draw_ahead(reference)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(6, 3, size, size)
    for step, rate in enumerate((0.3, 0.5, 0.1)):
        set_drop_rates(model, rate, "linear")
        set_drop_rates(reference, rate, "linear")
        backend.calls = 0
        torch.manual_seed(step)
        _loss(compiled(x)).backward()
        torch.manual_seed(step)
        _loss(reference(x)).backward()
        assert backend.calls == 1, (name, step, backend.calls)
        for (key, a), b in zip(model.named_parameters(), reference.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=key)
        model.zero_grad()
        reference.zero_grad()
    assert backend.compiled == 1


LANGUAGE_MODELS = {
    "transformers:LlamaForCausalLM": tiny_llama,
    "transformers:GPT2LMHeadModel": tiny_gpt2,
}


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_compiled_layer_drop_model_is_one_graph_per_forward(name):
    """layer_drop's converted layers under draw_ahead: the kept samples' hidden states, masks
    and position embeddings gathered in the graph; as many graph calls per forward as the
    library's own model compiled has (1 for Llama; GPT-2's loss adds a break of its own) at
    three rates, nothing recompiled, gradients equal to the eager steps."""
    from droppath import layer_drop

    model = LANGUAGE_MODELS[name]()
    ids = torch.randint(0, 128, (8, 16))
    torch._dynamo.reset()
    own = _Counting()
    torch.compile(copy.deepcopy(model).train(), backend=own)(ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    layer_drop(model, 0.5, "linear")
    reference = copy.deepcopy(model)
    draw_ahead(model)
    draw_ahead(reference)
    backend = _Counting()
    compiled = torch.compile(model, backend=backend)
    for step, rate in enumerate((0.3, 0.5, 0.1)):
        set_drop_rates(model, rate, "linear")
        set_drop_rates(reference, rate, "linear")
        backend.calls = 0
        torch.manual_seed(step)
        compiled(ids, labels=ids).loss.backward()
        torch.manual_seed(step)
        reference(ids, labels=ids).loss.backward()
        assert backend.calls == own.calls, (name, step, backend.calls, own.calls)
        for (key, a), b in zip(model.named_parameters(), reference.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=key)
        model.zero_grad()
        reference.zero_grad()
    assert backend.compiled == own.compiled
    if name == "transformers:LlamaForCausalLM":
        assert own.calls == 1
