"""Other libraries' models for ``droppath bench``: a timm, torchvision or Hugging Face model from
its name (``--model``), and a small Hugging Face Llama (``--kind llama``), with random weights.

Each library is imported when its model is built; a missing one is a ``ValueError`` that names it.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from droppath.apps.bench.config import BenchConfig
from droppath.site_rates import set_drop_rates

__all__ = ["LanguageModelLoss", "LibraryModel", "build_library_model", "build_llama"]


class LibraryModel(nn.Module):
    """A timm, torchvision or Hugging Face model as a module from images to one tensor (its
    logits, or its last hidden state)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        if isinstance(y, Tensor):
            return y
        out: Tensor = y.last_hidden_state if hasattr(y, "last_hidden_state") else y[0]
        return out


def build_library_model(cfg: BenchConfig) -> tuple[nn.Module, Tensor]:
    """The library's model with its own drop-path rates for ``p`` (``drop_path_rate``,
    ``stochastic_depth_prob``), random weights, and a batch of ``image``-pixel images."""
    library, _, name = str(cfg.model).partition(":")
    try:
        lib = importlib.import_module(library)
    except ImportError:
        raise ValueError(f"model {cfg.model!r} needs {library}: pip install {library}") from None
    size = cfg.image or 96
    net: nn.Module
    if library == "timm":
        try:
            net = lib.create_model(name, pretrained=False, drop_path_rate=cfg.p, img_size=size)
        except TypeError:  # a model without a fixed input size (ConvNeXt, ResNet, ...)
            net = lib.create_model(name, pretrained=False, drop_path_rate=cfg.p)
        except RuntimeError as e:
            raise ValueError(f"model must name a timm model, got {cfg.model!r}: {e}") from None
    elif library == "torchvision":
        models = importlib.import_module("torchvision.models")
        if not callable(getattr(models, name, None)):
            raise ValueError(f"model must name a torchvision model, got {cfg.model!r}")
        try:
            net = getattr(models, name)(stochastic_depth_prob=cfg.p)
        except TypeError:  # swin_t, maxvit_t: the builder fixes the rate; torchvision's linspace
            net = getattr(models, name)()
            set_drop_rates(net, cfg.p, "linspace")
    else:
        try:
            config = lib.AutoConfig.for_model(name, drop_path_rate=cfg.p, image_size=size)
        except ValueError as e:
            raise ValueError(f"model must name a transformers model type: {e}") from None
        net = lib.AutoModel.from_config(config)
    return LibraryModel(net), torch.randn(cfg.batch or 1, 3, size, size)


class LanguageModelLoss(nn.Module):
    """A Hugging Face causal LM as a module from token ids to its training loss."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        loss: Tensor = self.lm(input_ids=ids, labels=ids, use_cache=False).loss
        return loss


def build_llama(cfg: BenchConfig) -> tuple[nn.Module, Tensor]:
    """A small Llama (Hugging Face transformers, random weights): ``depth`` layers of width
    ``width``, MLP 4x, vocabulary 512, so that the layers and not the LM head hold the work."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "kind 'llama' needs Hugging Face transformers: pip install transformers"
        ) from None
    width, depth = cfg.width or 256, cfg.depth or 8
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 64),
        num_key_value_heads=max(1, width // 64),
        max_position_embeddings=max(cfg.tokens or 128, 128),
    )
    model = LanguageModelLoss(transformers.LlamaForCausalLM(config))
    ids = torch.randint(0, 512, (cfg.batch or 16, cfg.tokens or 128))
    return model, ids
