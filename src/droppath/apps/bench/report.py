"""What a bench reports: the machine it ran on, the Markdown table, the JSON file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["format_table", "machine_info", "write_json"]


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine and versions the numbers were measured on, written beside them."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    cfg = report["config"]
    memory_label = "peak MB" if report["machine"]["device"].startswith("cuda") else "saved MB"
    machine = report["machine"]
    where = f"torch {machine['torch']}, {machine['device']}, {machine['torch_threads']} threads"
    kept = f"kept fraction {report['kept_fraction']:.3f}"
    if "kept_work" in report:
        kept += f", kept work {report['kept_work']:.3f} (FLOPs)"
    if cfg["kind"] == "model":
        head = (
            f"model={cfg['model']} image={cfg['image']} batch={cfg['batch']} p={cfg['p']} "
            f"(the library's own rates) reps={cfg['reps']} ({kept}; {where})"
        )
        baseline, memory_baseline = "original", "original"
    else:
        head = (
            f"kind={cfg['kind']} depth={cfg['depth']} batch={cfg['batch']} width={cfg['width']} "
            f"p={cfg['p']} rule={cfg['rule']} mode={cfg['mode']} reps={cfg['reps']} "
            f"({kept}; {where})"
        )
        baseline = "plain"
        memory_baseline = "mask-multiply" if cfg["kind"] != "llama" else "plain"
    lines = [
        head,
        "",
        f"| variant | step ms (median) | vs {baseline} (median of paired ratios) | "
        f"{memory_label} | memory vs {memory_baseline} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['step_ms']:.1f} | {r['ratio']:.3f} | {r['memory_mb']:.1f} | "
            f"{r['memory_ratio_to_mask_multiply']:.3f} |"
        )
    ev = report["eval"]
    lines.append(
        f"| eval forward: droppath vs {baseline} | {ev['residual_ms']:.1f} | {ev['ratio']:.3f} "
        "| | |"
    )
    chosen = [
        f"{r['name']}: " + ", ".join(f"{n} {c}" for c, n in sorted(r["auto_choices"].items()))
        for r in report["results"]
        if r.get("auto_choices")
    ]
    if chosen:  # what strategy "auto" took at its sites, after the timed steps
        lines += ["", "auto chose, per site: " + "; ".join(chosen)]
    fell = [
        f"{r['name']}: {name} ({why.splitlines()[0]})"
        for r in report["results"]
        for name, why in r.get("fallbacks", {}).items()
    ]
    if fell:  # blocks whose check failed: they ran every row
        lines += ["", "fell back to the mask: " + "; ".join(fell)]
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``report`` to ``path`` atomically: a reader never sees half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, target)
