"""What ``droppath train`` trains: ``TrainConfig``, checked when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from droppath._checks import MODES, STRATEGIES, check_choice, check_positive_int, check_probability
from droppath._time_rules import TIME_RULES, check_time_options
from droppath.rates import DEPTH_RULES

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """What ``droppath train`` trains; its fields are the command's options, by name."""

    model: str = "resnet"
    depth: int | None = None
    p: float | None = None
    rule: str = "linear"
    time_rule: str = "constant"
    rule_options: dict[str, Any] = field(default_factory=dict)  # the time rule's options
    mode: str | None = None
    strategy: str = "auto"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    out: str = "runs/digits"
    compile: bool = False
    compare: bool = False
    data: str = "digits"
    data_dir: str | None = None
    image_size: int = 32
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    threads: int | None = None
    overwrite: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        # here, not at the top: both load torch, and ``droppath train --help`` reads the defaults
        from droppath.apps.data import DATASETS
        from droppath.models.registry import MODEL_NAMES

        check_choice(self.model, "model", MODEL_NAMES)
        if self.p is None:
            self.p = 0.5 if self.model == "resnet" else 0.1
        self.p = check_probability(self.p)
        if self.mode is None:
            self.mode = "batch" if self.model == "resnet" else "row"
        check_choice(self.mode, "mode", MODES)
        check_choice(self.rule, "rule", DEPTH_RULES)
        check_choice(self.time_rule, "time_rule", TIME_RULES)
        check_choice(self.strategy, "strategy", STRATEGIES)
        check_choice(self.data, "data", DATASETS)
        self.epochs = check_positive_int(self.epochs, "epochs")
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        if self.depth is not None:
            self.depth = check_positive_int(self.depth, "depth")
            if self.model == "resnet" and (self.depth - 2) % 6:
                raise ValueError(
                    f"depth must be 6n + 2 for model='resnet' (20, 56, 110...), got {self.depth}"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a number > 0, got {self.lr}")
        if self.stop_after is not None:
            self.stop_after = check_positive_int(self.stop_after, "stop_after")
        if self.threads is not None:
            self.threads = check_positive_int(self.threads, "threads")
        self.image_size = check_positive_int(self.image_size, "image_size")
        if self.mode == "batch" and self.strategy != "auto":
            raise ValueError(
                f"strategy applies to mode='row' only, got strategy={self.strategy!r} with "
                "mode='batch'"
            )
        if self.data_dir is not None and self.data == "digits":
            raise ValueError(
                "data_dir is for data='cifar10' or data='folder', got one with data='digits' "
                "(bundled)"
            )
        if self.data_dir is None and self.data != "digits":
            raise ValueError(f"data={self.data!r} needs data_dir, the folder that holds it")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other, got both")
        self.rule_options = check_time_options(self.time_rule, dict(self.rule_options))
