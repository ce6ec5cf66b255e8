"""The real models of ``accelerate``'s tests: timm, torchvision and transformers, built from configs
with random weights (no downloads), small enough for a CPU test, with an input for each.

``build(name, p, **extra)`` gives the model with the library's own ``drop_path_rate`` ``p``.
"""

from __future__ import annotations

from typing import Any

import torch

from conftest import require

# name: (library, builder arguments, input shape)
TIMM = {
    "vit_small_patch16_224": (dict(img_size=32, depth=4), (4, 3, 32, 32)),
    "deit_tiny_patch16_224": (dict(img_size=32), (4, 3, 32, 32)),
    "beit_base_patch16_224": (dict(img_size=32, depth=2), (4, 3, 32, 32)),
    "eva02_tiny_patch14_224": (dict(img_size=28, depth=4), (4, 3, 28, 28)),
    "convnext_tiny": ({}, (4, 3, 32, 32)),
    "swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=2), (4, 3, 64, 64)),
    "efficientnet_b0": ({}, (4, 3, 32, 32)),
    "resnet50": ({}, (4, 3, 32, 32)),
    "resnet18": ({}, (4, 3, 32, 32)),
    "swinv2_tiny_window8_256": (dict(img_size=64, window_size=2), (4, 3, 64, 64)),
}
TORCHVISION = {
    "convnext_tiny": (4, 3, 32, 32),
    "swin_t": (4, 3, 32, 32),
    "swin_v2_t": (4, 3, 32, 32),
    "efficientnet_b0": (4, 3, 32, 32),
    "maxvit_t": (2, 3, 224, 224),
}
HF = ("ConvNextModel", "Dinov2Model", "BeitModel", "SwinModel", "SegformerModel")

MODELS = (
    [f"timm:{n}" for n in TIMM]
    + [f"torchvision:{n}" for n in TORCHVISION]
    + [f"transformers:{n}" for n in HF]
)
# Where the library's own rates follow a rule other than linspace.
RULES = {
    "timm:efficientnet_b0": "efficientnet",
    "torchvision:efficientnet_b0": "efficientnet",
    "transformers:Dinov2Model": "uniform",
}
# Models with residual branches that hold BatchNorm: those stay on the mask by default.
BATCHNORM = {
    "timm:efficientnet_b0",
    "timm:resnet50",
    "timm:resnet18",
    "torchvision:efficientnet_b0",
    "torchvision:maxvit_t",
}


def _hf_config(name: str, p: float) -> Any:
    t = require("transformers")
    small = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        drop_path_rate=p,
    )
    if name == "ConvNextModel":
        return t.ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], drop_path_rate=p)
    if name == "Dinov2Model":
        return t.Dinov2Config(**small)
    if name == "BeitModel":
        return t.BeitConfig(**small, use_relative_position_bias=True, layer_scale_init_value=0.1)
    if name == "SwinModel":
        return t.SwinConfig(
            image_size=32,
            patch_size=4,
            embed_dim=8,
            depths=[2, 2],
            num_heads=[2, 2],
            window_size=4,
            drop_path_rate=p,
        )
    return t.SegformerConfig(
        num_encoder_blocks=2,
        depths=[2, 2],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 2],
        drop_path_rate=p,
    )


def build(name: str, p: float, **extra: Any) -> torch.nn.Module:
    """The model ``name`` ("library:model") with the library's drop-path rate ``p``."""
    library, model = name.split(":")
    if library == "timm":
        timm = require("timm")
        return timm.create_model(
            model, pretrained=False, drop_path_rate=p, **TIMM[model][0], **extra
        )
    if library == "torchvision":
        models = require("torchvision.models")
        if model == "swin_t":  # swin_t's and maxvit_t's builders fix the rate: their configs
            return models.SwinTransformer(
                patch_size=[4, 4],
                embed_dim=96,
                depths=[2, 2, 6, 2],
                num_heads=[3, 6, 12, 24],
                window_size=[7, 7],
                stochastic_depth_prob=p,
                **extra,
            )
        if model == "swin_v2_t":
            swin = require("torchvision.models.swin_transformer")
            return models.SwinTransformer(
                patch_size=[4, 4],
                embed_dim=96,
                depths=[2, 2, 6, 2],
                num_heads=[3, 6, 12, 24],
                window_size=[8, 8],
                stochastic_depth_prob=p,
                block=swin.SwinTransformerBlockV2,
                downsample_layer=swin.PatchMergingV2,
                **extra,
            )
        if model == "maxvit_t":
            return models.MaxVit(
                input_size=(224, 224),
                stem_channels=64,
                block_channels=[64, 128, 256, 512],
                block_layers=[2, 2, 5, 2],
                head_dim=32,
                stochastic_depth_prob=p,
                partition_size=7,
                **extra,
            )
        return getattr(models, model)(stochastic_depth_prob=p, **extra)
    t = require("transformers")
    return getattr(t, model)(_hf_config(model, p))


def example(name: str, seed: int = 0) -> torch.Tensor:
    """An input batch for ``name``."""
    library, model = name.split(":")
    shape = {"timm": lambda: TIMM[model][1], "torchvision": lambda: TORCHVISION[model]}.get(
        library, lambda: (4, 3, 32, 32)
    )()
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def output(y: Any) -> torch.Tensor:
    """The main output tensor of a model's output (a tensor, a ModelOutput, or a tuple)."""
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    return y[0]


def build_default(name: str, p: float) -> torch.nn.Module:
    """The model ``name`` as its library builds it by default (full size), with rate ``p``."""
    library, model = name.split(":")
    if library == "transformers":
        t = require("transformers")
        config = getattr(t, model.replace("Model", "Config"))(drop_path_rate=p)
        return getattr(t, model)(config)
    if library == "timm":
        return require("timm").create_model(model, pretrained=False, drop_path_rate=p)
    return build(name, p)


# The language models of layer_drop's tests (Llama's and GPT-2's layer stacks).


def tiny_llama(layers=4, seed=0, use_cache=False):
    """A 4-layer Llama causal LM with random weights (seeded)."""
    tf = require("transformers")
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        use_cache=use_cache,
    )
    return tf.LlamaForCausalLM(cfg)


def tiny_gpt2(seed=0, use_cache=False):
    """A 3-layer GPT-2 LM without dropout, random weights (seeded)."""
    tf = require("transformers")
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(
        vocab_size=128,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,  # no dropout: train mode is deterministic
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=use_cache,
    )
    return tf.GPT2LMHeadModel(cfg)
