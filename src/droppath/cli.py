"""The ``droppath`` command: ``droppath bench`` and ``droppath train``.

A user mistake (a bad option value, a missing data folder) prints one line and exits with 2;
tracebacks are left for bugs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

_C = TypeVar("_C")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def config_from_args(cls: type[_C], ns: argparse.Namespace, **overrides: Any) -> _C:
    """Build the dataclass ``cls`` from the parsed options that share its field names.

    Fields without an option keep their defaults; ``overrides`` set the others. Checks in the
    dataclass raise ValueError or TypeError, reported as a UsageError.
    """
    values = {
        f.name: getattr(ns, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in overrides and hasattr(ns, f.name)
    }
    try:
        return cls(**values, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="time a training step of a residual stack with each drop path variant",
        description="Time forward + backward of a residual stack: plain residual, the "
        "mask-multiply drop path of timm/torchvision, and droppath.Residual with each strategy, "
        "interleaved in one process; print medians and ratios.",
    )
    p.add_argument(
        "--kind",
        default="mlp",
        help="mlp or attn (a stack of transformer branches), conv (the CIFAR ResNet trunk), vit "
        "(a small ViT on 32x32 images) or llama (a small Hugging Face Llama, layer drop; needs "
        "transformers) (default: mlp)",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="residual blocks (default: 12; 54 for conv, ResNet-110's trunk; 6 ViT blocks)",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 64; 16 for llama)")
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="token width, or first-stage channels for conv (default: 192; 16)",
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens per sample (default: 32; 128 for llama)"
    )
    p.add_argument("-p", "--p", type=float, default=0.5, help="drop rate (default: 0.5)")
    p.add_argument(
        "--rule",
        default="uniform",
        help="depth rule: uniform, linear (the paper's decay to p), linspace, exp, log, sin, "
        "sigmoid or step (default: uniform)",
    )
    p.add_argument("--mode", default="row", help="row or batch (default: row)")
    p.add_argument("--reps", type=int, default=20, help="timed steps per variant (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--compile", action="store_true", help="time every variant under torch.compile (default)"
    )
    p.add_argument(
        "--bucket",
        type=int,
        default=None,
        help="also time row subset with batch sizes padded to a multiple of BUCKET",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="droppath", description="Stochastic depth that really skips the dropped work."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    from droppath.train import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "bench":
            from droppath.bench import bench_command

            return bench_command(ns)
        from droppath.train import train_command

        return train_command(ns)
    except UsageError as e:
        print(f"droppath {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
