"""``droppath train``: the parser and the handler (the work is in ``droppath.apps.train``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from droppath._time_rules import TIME_RULE_TABLE, TIME_RULES, RuleOption
from droppath.apps.commands import COMMANDS, UsageError, config_from_args, option_flags
from droppath.apps.train.config import TrainConfig
from droppath.rates import DEPTH_RULES

# The flags of the time rules' options (droppath._time_rules.TIME_RULE_TABLE): each option's type
# and what it is; the flag is "--" + the name with dashes, and its help adds the rules that take
# it and its default, from the table.
TIME_RULE_FLAGS: dict[str, tuple[type, str]] = {
    "warmup_steps": (int, "steps to reach the full rates"),
    "cutoff_step": (int, "the step where the rule switches"),
    "shape": (str, "linear or constant rate before the cutoff"),
    "theta_bar": (float, "final keep ratio"),
    "gamma": (float, "decay rate, > 0"),
}


def time_rule_options() -> dict[str, RuleOption]:
    """Every option of every time rule, by name: one flag each."""
    return {o.name: o for rule in TIME_RULE_TABLE.values() for o in rule.options}


def _flag_help(option: RuleOption) -> str:
    rules = [r.name for r in TIME_RULE_TABLE.values() if option in r.options]
    default = "" if option.required else f"; default: {option.default}"
    return f"{TIME_RULE_FLAGS[option.name][1]} ({', '.join(rules)}{default})"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``droppath train`` to the command line."""
    # the defaults, read from the fields: building a config would check it, and load torch
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})
    p = sub.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train a reference model and report test accuracy and time per epoch. With "
        "--compare, train it twice with the same seed, with and without stochastic depth, and "
        "print them side by side. Works the same under torchrun --nproc_per_node=N.",
    )
    a = p.add_argument
    a("--model", default=d.model, help="resnet (the paper's CIFAR ResNet) or vit (default: resnet)")
    a("--depth", type=int, default=None, help="resnet: 6n+2 (default 110); vit: blocks (default 6)")
    a(
        "-p",
        "--p",
        type=float,
        default=None,
        help="drop rate of the last block (default: 0.5 for resnet, 0.1 for vit)",
    )
    a("--rule", default=d.rule, help=f"depth rule: {', '.join(DEPTH_RULES)} (default: linear)")
    a(
        "--time-rule",
        default=d.time_rule,
        help=f"{', '.join(TIME_RULES)} (default: constant)",
    )
    for option in time_rule_options().values():  # one flag per option of the time rules' table
        a(
            f"--{option.name.replace('_', '-')}",
            type=TIME_RULE_FLAGS[option.name][0],
            default=None,
            help=_flag_help(option),
        )
    a(
        "--mode",
        default=None,
        help="batch or row (default: batch for resnet, as in the paper; row for vit)",
    )
    a("--strategy", default=d.strategy, help="row mode: auto, subset or mask (default: auto)")
    a("--epochs", type=int, default=d.epochs, help=f"epochs (default: {d.epochs})")
    a(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"global batch size, split across processes (default: {d.batch_size})",
    )
    a("--lr", type=float, default=d.lr, help=f"SGD learning rate, cosine decay (default: {d.lr})")
    a("--seed", type=int, default=d.seed, help="seed (default: 0)")
    a("--out", default=d.out, help=f"output folder, made if missing (default: {d.out})")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--compare", action="store_true", help="also train without stochastic depth and compare")
    a("--data", default=d.data, help="digits (bundled), cifar10 or folder (default: digits)")
    a("--data-dir", default=None, help="folder of --data cifar10 or --data folder")
    a("--image-size", type=int, default=d.image_size, help="side of --data folder images")
    a("--resume", action="store_true", help="continue from the checkpoints in --out")
    a(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --out (without it, a previous run there is an error)",
    )
    a(
        "--stop-after",
        type=int,
        default=None,
        help="stop once this many epochs are done, as an interruption would (to test --resume)",
    )
    a("--threads", type=int, default=None, help="torch threads per process")
    a(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms: a run, resumed or not, gives the same weights "
        "(strategy auto then takes the subset everywhere, measuring nothing)",
    )
    a(
        "--no-progress",
        action="store_true",
        help="no progress bar (on a terminal) and no line per epoch (elsewhere)",
    )
    p.set_defaults(handler=run, flags=option_flags(p))


def _flags(names: list[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def _rule_options_from_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """The time rule's options from their flags; a flag of another rule is an error, and so is
    a missing one that the rule needs (both named as flags, from the rules' table)."""
    given = {n: getattr(ns, n) for n in time_rule_options() if getattr(ns, n, None) is not None}
    rule = TIME_RULE_TABLE.get(ns.time_rule)
    if rule is None:  # an unknown rule: the config names it, with the rules there are
        return given
    stray = sorted(set(given) - {o.name for o in rule.options})
    if stray:
        raise UsageError(f"{_flags(stray)} is not an option of --time-rule {ns.time_rule}")
    missing = [o.name for o in rule.options if o.required and o.name not in given]
    if missing:
        raise UsageError(f"--time-rule {ns.time_rule} needs {_flags(missing)}")
    return given


def run(ns: argparse.Namespace) -> int:
    """Build the config from the options and train; data problems become one-line errors."""
    from droppath.apps.data import DataError  # here: torch loads when the command runs
    from droppath.apps.train import train

    options = _rule_options_from_flags(ns)
    cfg = config_from_args(TrainConfig, ns, progress=not ns.no_progress, rule_options=options)
    try:
        train(cfg)
    except DataError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:  # files are written together (see droppath.apps.train): consistent
        print(
            f"droppath train: interrupted; continue with --resume --out {cfg.out}", file=sys.stderr
        )
        return 130
    return 0
