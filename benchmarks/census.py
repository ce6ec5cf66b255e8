"""Census: how much of timm's and Hugging Face transformers' models ``accelerate`` reaches.

For every timm architecture module, one model (the smallest variant that builds, random weights,
``drop_path_rate=0.1``); for every transformers vision model type whose config takes
``drop_path_rate``, one model from its default config made small. Each is accelerated with
``batchnorm="subset"`` and run for one training step, which verifies every derived block against
its own forward (see ``droppath.accelerate``). Printed per family: sites, how they run, why not.

    python benchmarks/census.py [--timm] [--hf] [--json out.json] [--only NAME ...]

Each row records how its model was built (``small``, ``size``), so that ``replay(row)`` builds the
same model again without the search for the smallest variant: CI's test of the census replays
every row of ``census.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import droppath._derive.ops as ops
from droppath import accelerate, drop_path_sites, set_drop_rates
from droppath.acceleration import check_states

_SIZE = ["atto", "femto", "pico", "nano", "tiny", "mini", "xxs", "xs", "small", "t", "s"]


@dataclass
class Family:
    library: str
    family: str
    model: str
    sites: int = 0
    runs: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    # the checks of a family (None: not run): eval and rate-0 training bit-identical to the
    # original model; branch calls in a training step at rate 1 (0: the shortcuts alone run)
    eval_same: bool | None = None
    zero_same: bool | None = None
    branches_at_one: int | None = None
    # site calls in that rate-0 training step, where each block runs its own forward (0: the
    # sites never run, as in an EfficientNet whose every block changes shape, and no check can
    # fail: the search takes the next variant)
    called: int | None = None
    # how the model was built: ``small`` (timm: ``img_size=64`` where the model takes it, and
    # 64-pixel images; transformers: at most 2 layers per stack) and ``size`` (transformers: the
    # image size, None for the config's own)
    small: bool | None = None
    size: int | None = None


def _rank(name: str) -> tuple[int, int, str]:
    words = re.split(r"[_.\-]", name)
    best = min((i for i, k in enumerate(_SIZE) for w in words if w.startswith(k)), default=99)
    return (-1 if name.startswith("test_") else best), len(name), name


def _step(model: nn.Module, x: Any) -> None:
    model.train()
    out = _call(model, x)
    if out.requires_grad:  # every branch dropped, no shortcut (CvT's layers): nothing to do
        out.float().sum().backward()


def _out(y: Any) -> torch.Tensor:
    while not isinstance(y, torch.Tensor):
        hidden = getattr(y, "last_hidden_state", None)
        y = hidden if hidden is not None else y[0]
    return y


def _call(model: nn.Module, x: Any) -> torch.Tensor:
    return _out(model(**x) if isinstance(x, dict) else model(x))


def _same(a: nn.Module, b: nn.Module, x: Any, train: bool) -> bool:
    a.train(train), b.train(train)
    with torch.no_grad():
        torch.manual_seed(1)
        ya = _call(a, x)
        torch.manual_seed(1)
        yb = _call(b, x)
    return torch.equal(ya, yb)


def _branches_at_rate_one(model: nn.Module, x: Any) -> int:
    """How many times a derived branch runs with grad in a training step at rate 1."""
    calls = [0]
    original = ops._Gathered.__call__

    def counting(fn: Any) -> Any:
        def call(self: Any, *args: Any) -> Any:
            calls[0] += torch.is_grad_enabled()
            return fn(self, *args)

        return call

    ops._Gathered.__call__ = counting(original)  # type: ignore[method-assign]
    try:
        set_drop_rates(model, 1.0, "uniform")
        _step(model, x)
    finally:
        ops._Gathered.__call__ = original  # type: ignore[method-assign]
    return calls[0]


def _vary_constants(model: nn.Module) -> None:
    """Draw from a normal distribution the parameters that the library initialises to one value:
    layer scales at 1e-5 or 1e-6, a residual branch's last BatchNorm or gain at 0, norm weights at
    1, biases at 0. With a branch scaled by 1e-6 or 0, the check of a derived forward (outputs and
    gradients within a tolerance relative to their scale) could not tell a wrong one."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and bool((p == p.flatten()[0]).all()):
                p.normal_()


def check(row: Family, model: nn.Module, x: Any, checks: bool) -> None:
    """Accelerate ``model`` and train one step (which verifies every derived block); with
    ``checks``, compare with an untouched copy in eval and at rate 0, and count the branches run
    at rate 1."""
    _vary_constants(model)
    original = copy.deepcopy(model) if checks else None
    report = accelerate(model, batchnorm="subset")
    if original is not None:
        row.eval_same = _same(model, original, x, train=False)
    # every block gets a rate, so that this step verifies each (a block at 0 runs its own forward)
    set_drop_rates(model, 0.1, "uniform")
    _step(model, x)
    _account(row, model, report)
    if original is not None:
        set_drop_rates(model, 0.0, "uniform")
        set_drop_rates(original, 0.0, "uniform")
        calls = Counter[str]()
        hooks = [
            m.register_forward_hook(lambda *_: calls.update(["call"]))
            for _, m in drop_path_sites(model)
        ]
        try:
            row.zero_same = _same(model, original, x, train=True)
        finally:
            for hook in hooks:
                hook.remove()
        row.called = calls["call"]
        if not row.called:
            raise RuntimeError("no drop-path site is called: nothing to check")
        row.branches_at_one = _branches_at_rate_one(model, x)


def _shape(reason: str) -> str:
    """A reason without its numbers, so that a family's blocks group under one line."""
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", reason.splitlines()[0])[:160]


def _account(row: Family, model: nn.Module, report: Any) -> None:
    """Count the sites as they run after the step, not as ``accelerate`` planned them: a site of a
    block whose check failed runs on the mask, and one whose block was never checked (never called
    in training with inputs that could tell) is counted apart as ``unchecked``, not as skipping."""
    states = check_states(model)
    runs: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for r in report:
        state = states.get(r.name.rpartition(".")[0], "verified")  # else droppath's own site
        if r.runs != "mask" and state.startswith("failed: "):
            runs["mask"] += 1
            reasons[f"{r.block}: {_shape(state.removeprefix('failed: '))}"] += 1
        elif r.runs != "mask" and state == "pending":
            runs["unchecked"] += 1
            reasons[f"{r.block}: unchecked after the step"] += 1
        else:
            runs[r.runs] += 1
            if r.runs == "mask":
                reasons[f"{r.block}: {_shape(r.reason)}"] += 1
    row.sites, row.runs, row.reasons = len(report), dict(runs), dict(reasons)


def _build_timm(name: str, small: bool) -> nn.Module:
    import timm

    if small:
        try:
            return timm.create_model(name, pretrained=False, drop_path_rate=0.1, img_size=64)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=False, drop_path_rate=0.1)


def _timm_input(model: nn.Module, small: bool) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    if small:
        h = w = 64
    return torch.randn(2, c, h, w)


# A family whose smallest variant is larger than this is left out (its row says so): a step of it
# does not fit this census's time on a 2-core machine.
_LARGEST = 150e6


def _smallest(names: list[str], candidates: int = 8) -> list[str]:
    """The likeliest small variants, by parameter count (counted on the meta device)."""
    import timm

    sizes: list[tuple[float, str]] = []
    for name in sorted(names, key=_rank)[:candidates]:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, drop_path_rate=0.1)
        except TypeError as error:  # no drop_path_rate: not a candidate
            if "drop_path_rate" not in str(error):
                sizes.append((_LARGEST, name))
            continue
        except Exception:
            sizes.append((_LARGEST, name))  # meta linspace): a candidate, tried last
            continue
        sizes.append((sum(p.numel() for p in model.parameters()), name))
    return [name for size, name in sorted(sizes) if size <= _LARGEST][:5]


def timm_family(
    module: str, checks: bool = False, pinned: tuple[str, bool] | None = None
) -> Family:
    """The row of a timm architecture module; ``pinned``: ``(model, small)`` to build instead of
    searching for the smallest variant."""
    import timm

    row = Family("timm", module, "")
    t0 = time.perf_counter()
    names = [pinned[0]] if pinned else _smallest(timm.list_models(module=module))
    for name in names:
        for small in [pinned[1]] if pinned else [True, False]:
            try:
                model = _build_timm(name, small)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    check(row, model, _timm_input(model, small), checks)
            except Exception as error:
                row.error = f"{name}: {type(error).__name__}: {str(error)[:120]}"
                continue
            row.model, row.error, row.small = name, "", small
            row.seconds = time.perf_counter() - t0
            return row
    row.seconds = time.perf_counter() - t0
    if not row.error and not pinned:
        row.error = _why_none(timm.list_models(module=module))
    return row


def _why_none(names: list[str]) -> str:
    """Why no model of a family ran: none takes ``drop_path_rate``, or all are too large."""
    import timm

    for name in sorted(names, key=_rank)[:8]:
        try:
            with torch.device("meta"):
                timm.create_model(name, pretrained=False, drop_path_rate=0.1)
        except TypeError as error:
            if "drop_path_rate" in str(error):
                continue
            return f"{name}: {error}"
        except Exception as error:
            return f"{name}: {type(error).__name__}: {str(error)[:120]}"
        return f"left out: no variant of at most {_LARGEST / 1e6:.0f}M parameters"
    return "no drop_path_rate"


@functools.cache
def _hf_classes() -> list[tuple[str, Any, Any]]:
    """``(model type, config class, model class)`` for every transformers model type whose config
    takes ``drop_path_rate``; the model class is the base model (AutoModel) or, without one, the
    first model class of its module built on that config."""
    import inspect

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    found = []
    for model_type, config_cls in CONFIG_MAPPING.items():
        try:
            if "drop_path_rate" not in inspect.signature(config_cls.__init__).parameters:
                continue
        except (TypeError, ValueError):
            continue
        name = MODEL_MAPPING_NAMES.get(model_type)
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None:
            module = (
                sys.modules[config_cls.__module__.replace("configuration_", "modeling_")]
                if config_cls.__module__.replace("configuration_", "modeling_") in sys.modules
                else None
            )
            if module is None:
                import importlib

                try:
                    module = importlib.import_module(
                        config_cls.__module__.replace("configuration_", "modeling_")
                    )
                except ImportError:
                    module = None
            candidates = (
                [
                    c
                    for c in vars(module).values()
                    if isinstance(c, type)
                    and getattr(c, "config_class", None) is config_cls
                    and not c.__name__.endswith("PreTrainedModel")
                ]
                if module is not None
                else []
            )
            candidates.sort(key=lambda c: (not c.__name__.endswith("Model"), len(c.__name__)))
            cls = candidates[0] if candidates else None
        found.append((model_type, config_cls, cls))
    return found


def _hf_config(config_cls: Any, small: bool, image: int | None = None) -> Any:
    """The default config with ``drop_path_rate=0.1`` (one per stage where it is a list) and,
    when ``small``, at most 2 layers per stack; ``image``: the image size, where it has one."""
    default = config_cls()
    rate = getattr(default, "drop_path_rate", 0.0)
    kwargs: dict[str, Any] = {
        "drop_path_rate": [0.1] * len(rate) if isinstance(rate, list | tuple) else 0.1
    }
    if small:
        # the encoder's and a predictor's (V-JEPA 2) stacks
        for attr in ("num_hidden_layers", "num_layers", "pred_num_hidden_layers"):
            value = getattr(default, attr, None)
            if isinstance(value, int) and value > 2:
                kwargs[attr] = 2
        # EoMT: the last num_blocks layers of the encoder also process the queries
        blocks = getattr(default, "num_blocks", None)
        if isinstance(blocks, int) and blocks > 1 and "num_hidden_layers" in kwargs:
            kwargs["num_blocks"] = 1
        for attr in ("depths", "depth"):
            value = getattr(default, attr, None)
            if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
                kwargs[attr] = [min(v, 2) for v in value]
    if image is not None and isinstance(getattr(default, "image_size", None), int):
        kwargs["image_size"] = image
    try:
        return config_cls(**kwargs)
    except Exception as error:
        # a config that declares its rate an integer (Timesformer's ``drop_path_rate: int``)
        # refuses 0.1: built without it, the rate is set past the type check
        if "drop_path_rate" not in str(error):
            raise
        config = config_cls(**{k: v for k, v in kwargs.items() if k != "drop_path_rate"})
        object.__setattr__(config, "drop_path_rate", kwargs["drop_path_rate"])
        return config


def _hf_input(model: nn.Module, config: Any, size: int | None) -> dict[str, torch.Tensor]:
    import inspect

    params = inspect.signature(model.forward).parameters
    c = int(getattr(config, "num_channels", 3) or 3)
    image = getattr(config, "image_size", 224)
    h, w = (image, image) if isinstance(image, int) else tuple(image)[-2:]
    if size is not None:
        h = w = size
    frames = int(getattr(config, "num_frames", 0) or getattr(config, "frames_per_clip", 0) or 0)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in params:
            shape = (2, frames, c, h, w) if frames else (2, c, h, w)
            return {key: torch.randn(*shape)}
    if "input_features" in params:
        bins = int(getattr(config, "num_mel_bins", 64))
        return {"input_features": torch.randn(2, 1, int(getattr(config, "spec_size", 256)), bins)}
    raise TypeError(f"no image input among {list(params)[:4]}")


def hf_family(
    model_type: str,
    config_cls: Any,
    cls: Any,
    checks: bool = False,
    pinned: tuple[bool, int | None] | None = None,
) -> Family:
    """The row of a transformers model type; ``pinned``: ``(small, size)`` to build instead of
    trying the smallest config first."""
    row = Family("transformers", model_type, getattr(cls, "__name__", ""))
    t0 = time.perf_counter()
    if cls is None:
        row.error = "no model class found"
        return row
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in cls(_hf_config(config_cls, True)).parameters())
    except Exception:
        count = 0
    if count > _LARGEST:
        row.error = f"left out: {count / 1e6:.0f}M parameters at 2 layers per stack"
        return row
    for small, size in [pinned] if pinned else [(True, 64), (True, None), (False, None)]:
        try:
            config = _hf_config(config_cls, small, size)
            model = cls(config)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check(row, model, _hf_input(model, config, size), checks)
        except Exception as error:
            row.error = f"{type(error).__name__}: {str(error)[:160]}"
            continue
        row.error, row.small, row.size = "", small, size
        break
    row.seconds = time.perf_counter() - t0
    return row


def replay(recorded: dict[str, Any], checks: bool = True) -> Family:
    """A row of ``--json`` measured again on the model it records, built the same way (no search
    for the smallest variant)."""
    if recorded["library"] == "timm":
        return timm_family(
            recorded["family"], checks, pinned=(recorded["model"], bool(recorded["small"]))
        )
    found = {t: (c, m) for t, c, m in _hf_classes()}
    config_cls, cls = found[recorded["family"]]
    return hf_family(
        recorded["family"],
        config_cls,
        cls,
        checks,
        pinned=(bool(recorded["small"]), recorded["size"]),
    )


def _print(row: Family) -> None:
    mask = row.runs.get("mask", 0)
    checks = (
        ""
        if row.eval_same is None
        else (f" eval={row.eval_same} zero={row.zero_same} at1={row.branches_at_one}")
    )
    print(
        f"{row.family:28s} {row.model:40s} sites {row.sites:4d} mask {mask:4d} "
        f"{row.seconds:5.1f}s{checks} {row.error}",
        flush=True,
    )
    for reason, count in row.reasons.items():
        print(f"    {count:4d}  {reason}", flush=True)


def _skipping(sites: int, runs: dict[str, int]) -> int:
    """Sites that skip work after the step: neither on the mask nor unchecked."""
    return sites - runs.get("mask", 0) - runs.get("unchecked", 0)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The census as a Markdown table (from the rows of ``--json``), totals per library last."""
    head = "| library | family | model | sites | skip work | on the mask, why | checks |"
    lines = [head, "|---|---|---|---:|---:|---|---|"]
    for r in rows:
        if not r["sites"]:
            continue
        mask = r["runs"].get("mask", 0) + r["runs"].get("unchecked", 0)
        why = "; ".join(f"{n} {reason}" for reason, n in r["reasons"].items()) or ""
        checks = (
            ""
            if r.get("eval_same") is None
            else "ok"
            if (r["eval_same"] and r["zero_same"] and r["branches_at_one"] == 0)
            else f"eval={r['eval_same']} rate0={r['zero_same']} at1={r['branches_at_one']}"
        )
        why = why.replace("|", "\\|")
        lines.append(
            f"| {r['library']} | {r['family']} | {r['model']} | {r['sites']} | "
            f"{r['sites'] - mask} | {why} | {checks} |"
        )
    for library in dict.fromkeys(r["library"] for r in rows):
        mine = [r for r in rows if r["library"] == library]
        total = sum(r["sites"] for r in mine)
        skip = sum(_skipping(r["sites"], r["runs"]) for r in mine)
        lines.append(
            f"| **{library}** | {sum(1 for r in mine if r['sites'])} families | | **{total}** | "
            f"**{skip}** ({100 * skip / max(total, 1):.1f} %) | | |"
        )
    return "\n".join(lines)


def _total(library: str, rows: list[Family]) -> str:
    total = sum(r.sites for r in rows)
    skip = sum(_skipping(r.sites, r.runs) for r in rows)
    return f"{library}: {skip} of {total} sites skip work ({100 * skip / max(total, 1):.0f} %)"


def run(
    libraries: tuple[str, ...] = ("timm", "transformers"),
    only: Any = None,
    checks: bool = False,
    save: Any = None,
) -> list[Family]:
    """Build, accelerate and step one model per family; the rows, printed (and given to
    ``save``) as they come."""
    rows: list[Family] = []
    if "timm" in libraries:
        import timm

        for module in timm.list_modules():
            if not only or module in only:
                rows.append(timm_family(module, checks))
                _print(rows[-1])
                if save is not None:
                    save(rows)
    if "transformers" in libraries:
        for model_type, config_cls, cls in _hf_classes():
            if not only or model_type in only:
                rows.append(hf_family(model_type, config_cls, cls, checks))
                _print(rows[-1])
                if save is not None:
                    save(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--library", nargs="*", default=["timm", "transformers"])
    parser.add_argument("--only", nargs="*", default=None, help="families to run")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument(
        "--update", action="store_true", help="replace the families run in --json, keep the rest"
    )
    parser.add_argument(
        "--checks", action="store_true", help="also compare eval and rate 0 with the original"
    )
    parser.add_argument("--markdown", default=None, help="print this --json file as a table")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    torch.manual_seed(0)
    old: list[dict[str, Any]] = []
    if args.json and args.update and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)

    def save(rows: list[Family]) -> None:
        if not args.json:
            return
        new = {(r.library, r.family): asdict(r) for r in rows}
        merged = [new.pop((o["library"], o["family"]), o) for o in old]
        with open(args.json, "w") as f:
            json.dump([*merged, *new.values()], f, indent=1)

    rows = run(tuple(args.library), args.only, args.checks, save)
    for library in args.library:
        print(_total(library, [r for r in rows if r.library == library]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
