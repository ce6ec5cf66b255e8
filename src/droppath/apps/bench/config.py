"""What ``droppath bench`` times: ``BenchConfig``, checked when it is built, and the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from droppath._checks import (
    MODES,
    check_bucket,
    check_choice,
    check_positive_int,
    check_probability,
)
from droppath.rates import DEPTH_RULES

__all__ = ["AUTOCAST", "KINDS", "LIBRARIES", "BenchConfig", "check_device"]

KINDS = ("mlp", "attn", "conv", "vit", "llama")
AUTOCAST = ("bfloat16", "float16")  # the dtypes a step's forward can run in under autocast
LIBRARIES = ("timm", "torchvision", "transformers")


@dataclass
class BenchConfig:
    """What ``droppath bench`` times: a stack of ``kind``, or with ``model`` ("timm:NAME",
    "torchvision:NAME" or "transformers:MODEL_TYPE") a library's model, original vs
    ``droppath.accelerate``, at the library's own rates for ``p`` on ``image``-pixel images.
    ``autocast``: each step's forward under ``torch.autocast`` in that dtype (as timm and DINOv2
    train); ``channels_last``: the model and its images in that memory format (convnets);
    ``compile_backend``: ``torch.compile``'s backend with ``compile`` ("eager" captures the
    graphs without compiling them: a quick check of graph capture)."""

    kind: str = "mlp"
    depth: int | None = None
    batch: int | None = None
    width: int | None = None
    tokens: int | None = None
    p: float = 0.5
    rule: str | None = None
    mode: str | None = None
    reps: int = 20
    warmup: int = 5
    threads: int | None = None
    seed: int = 0
    compile: bool = False
    compile_backend: str = "inductor"
    bucket: int | None = None
    model: str | None = None
    image: int | None = None
    autocast: str | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.p = check_probability(self.p)
        if self.autocast is not None:
            check_choice(self.autocast, "autocast", AUTOCAST)
        self.reps = check_positive_int(self.reps, "reps")
        self.warmup = check_positive_int(self.warmup, "warmup", minimum=0)
        if self.threads is not None:
            self.threads = check_positive_int(self.threads, "threads")
        if self.model is not None:
            self._check_model()
            return
        if self.image is not None:
            raise ValueError("image applies to a library model only (model='timm:NAME', ...)")
        self.rule = "uniform" if self.rule is None else self.rule
        self.mode = "row" if self.mode is None else self.mode
        check_choice(self.kind, "kind", KINDS)
        check_choice(self.rule, "rule", DEPTH_RULES)
        check_choice(self.mode, "mode", MODES)
        if self.depth is None:
            self.depth = {"conv": 54, "vit": 6, "llama": 8}.get(self.kind, 12)
        if self.width is None:
            self.width = {"conv": 16, "llama": 256}.get(self.kind, 192)
        self.depth = check_positive_int(self.depth, "depth")
        if self.kind == "conv" and self.depth % 3:
            raise ValueError(f"depth must be a multiple of 3 for kind='conv', got {self.depth}")
        self.width = check_positive_int(self.width, "width")
        llama = self.kind == "llama"
        # None takes the default; any other value is checked (0 is refused, not replaced)
        self.batch = check_positive_int(_given(self.batch, 16 if llama else 64), "batch")
        self.tokens = check_positive_int(_given(self.tokens, 128 if llama else 32), "tokens")
        self.bucket = check_bucket(self.bucket)
        if self.channels_last and self.kind != "conv":
            raise ValueError(
                f"channels_last applies to kind='conv' or a library model, got kind={self.kind!r}"
            )
        heads = max(1, self.width // 64)
        if self.kind in ("attn", "vit", "llama") and self.width % heads:
            raise ValueError(
                f"width must be a multiple of the {heads} attention heads (width // 64) for "
                f"kind={self.kind!r}, got {self.width}"
            )

    def _check_model(self) -> None:
        """The checks of a library model's bench; the stack's options do not apply to it."""
        library, _, name = str(self.model).partition(":")
        if library not in LIBRARIES or not name:
            raise ValueError(
                f"model must be LIBRARY:NAME with LIBRARY one of {', '.join(LIBRARIES)}, "
                f"got {self.model!r}"
            )
        given = [
            f
            for f, v in (
                ("depth", self.depth),
                ("width", self.width),
                ("tokens", self.tokens),
                ("rule", self.rule),
                ("mode", self.mode),
                ("bucket", self.bucket),
            )
            if v is not None
        ]
        if self.kind != "mlp" and self.kind != "model":
            given.insert(0, "kind")
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise ValueError(
                f"{', '.join(given)} {verb} not apply to a library model (it has its own blocks "
                f"and rates), got with model={self.model!r}"
            )
        self.kind = "model"
        self.batch = check_positive_int(_given(self.batch, 32), "batch")
        self.image = check_positive_int(_given(self.image, 96), "image")


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def check_device(device: str) -> torch.device:
    """The device to time on: ``cpu``, or ``cuda[:N]`` where CUDA is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be 'cpu' on this machine (no CUDA), got {device!r}")
    return dev
