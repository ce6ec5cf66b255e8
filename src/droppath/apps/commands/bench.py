"""``droppath bench``: the parser and the handler (the work is in ``droppath.apps.bench``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from droppath.apps.commands import COMMANDS, UsageError, config_from_args, option_flags


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``droppath bench`` to the command line."""
    p = sub.add_parser(
        "bench",
        help=COMMANDS["bench"],
        description="Time forward + backward of a residual stack: plain residual, the "
        "mask-multiply drop path of timm/torchvision, and droppath.Residual with each strategy; "
        "or, with --model, a timm, torchvision or Hugging Face model as built vs accelerated by "
        "droppath.accelerate. Variants are interleaved in one process; print medians and ratios.",
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
        default=None,
        help="depth rule: uniform, linear (the paper's decay to p), linspace, efficientnet, exp, "
        "log, sin, sigmoid or step (default: uniform)",
    )
    p.add_argument("--mode", default=None, help="row or batch (default: row)")
    p.add_argument(
        "--model",
        default=None,
        metavar="LIBRARY:NAME",
        help="time a library's model instead of a stack: timm:NAME, torchvision:NAME or "
        "transformers:MODEL_TYPE (random weights), original vs droppath.accelerate, at the "
        "library's own rates for -p (its drop_path_rate); needs that library",
    )
    p.add_argument("--image", type=int, default=None, help="image side for --model (default: 96)")
    p.add_argument("--reps", type=int, default=20, help="timed steps per variant (default: 20)")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed steps first, in which strategy auto measures its costs (default: 5)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="time every variant under torch.compile (default: eager)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        metavar="NAME",
        help="torch.compile's backend with --compile (default: inductor; eager: capture only)",
    )
    p.add_argument(
        "--autocast",
        default=None,
        metavar="DTYPE",
        help="run each step's forward under torch.autocast in DTYPE: bfloat16 or float16 "
        "(default: none, float32)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="the model and its images in channels_last (kind conv or a library model; on a "
        "GPU, kind conv always is)",
    )
    p.add_argument(
        "--bucket",
        type=int,
        default=None,
        help="also time row subset with batch sizes padded to a multiple of BUCKET",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results as JSON (missing folders are made)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run, flags=option_flags(p))


def run(ns: Any) -> int:
    """Check the options, run the bench, print the table, write the JSON."""
    from droppath.apps.bench import (
        BenchConfig,
        check_device,
        check_memory,
        format_table,
        run_bench,
        write_json,
    )

    try:
        device = check_device(ns.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if ns.json:  # checked before the work, not after it; missing folders made, as train --out
        folder = Path(ns.json).resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = f" ({e.strerror})" if e.strerror else ""
            raise UsageError(
                f"--json must be a path in a writable folder, got {ns.json!r}{why}"
            ) from None
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--json must be a path in a writable folder, got {ns.json!r}")
    cfg = config_from_args(BenchConfig, ns)
    try:
        check_memory(cfg, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        report = run_bench(cfg, device=ns.device, progress=not ns.no_progress)
    except ValueError as e:  # a library model that cannot be built: named, one line
        if cfg.model is None:
            raise
        raise UsageError(str(e)) from None
    print(format_table(report))
    if ns.json:
        write_json(report, ns.json)
    return 0
