"""Compare strategy "auto" with the faster of "mask" and "subset", per `droppath bench` report.

Usage: python benchmarks/auto_check.py DIR [DIR ...]. For every JSON report in the
folders that times the three Residual strategies (row mode), prints the step-time ratios (median
of paired ratios to the plain step), the best of mask and subset, auto's distance to it, and what
auto chose per site. Exits 1 when auto is more than --tolerance (0.02) above the best anywhere.
"""

import argparse
import json
import sys
from pathlib import Path

STRATEGIES = ("Residual mask", "Residual subset", "Residual auto")


def rows(folder: Path) -> list[dict]:
    found = []
    for path in sorted(folder.glob("*.json")):
        report = json.loads(path.read_text())
        by_name = {r["name"]: r for r in report.get("results", [])}
        if not all(s in by_name for s in STRATEGIES):
            continue
        mask, subset, auto = (by_name[s]["ratio"] for s in STRATEGIES)
        choices = by_name["Residual auto"].get("auto_choices", {})
        found.append(
            {
                "setup": path.stem,
                "mask": mask,
                "subset": subset,
                "auto": auto,
                "gap": auto - min(mask, subset),
                "chose": ", ".join(f"{n} {c}" for c, n in sorted(choices.items())) or "?",
            }
        )
    return found


def table(folders: list[Path]) -> str:
    """The comparison as a Markdown table, with a closing line: the number of setups and the
    largest gap of auto over the faster strategy."""
    found = [row for folder in folders for row in rows(folder)]
    lines = [
        "| setup | mask | subset | auto | auto - best | auto chose |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in found:
        lines.append(
            f"| {r['setup']} | {r['mask']:.3f} | {r['subset']:.3f} | {r['auto']:.3f} | "
            f"{r['gap']:+.3f} | {r['chose']} |"
        )
    lines += ["", f"{len(found)} setups; largest gap of auto over the best: {worst(found):+.3f}"]
    return "\n".join(lines)


def worst(found: list[dict]) -> float:
    return max((r["gap"] for r in found), default=0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    print(table(args.folders))
    found = [row for folder in args.folders for row in rows(folder)]
    return 0 if worst(found) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
