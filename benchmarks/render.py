"""Print the README's benchmark tables from the JSON files that benchmarks/run_all.sh wrote."""

import json
import sys
from pathlib import Path

ORDER = [
    ("mlp-row-p0.5-uniform", "Transformer MLP, row mode, p = 0.5 uniform"),
    ("mlp-row-p0.5-linear", "Transformer MLP, row mode, linear decay to p = 0.5"),
    ("mlp-row-p0.1-uniform", "Transformer MLP, row mode, p = 0.1 uniform"),
    ("attn-row-p0.5-linear", "Attention, row mode, linear decay to p = 0.5"),
    ("resnet110-batch-linear", "ResNet-110 trunk, batch mode, linear decay to p = 0.5"),
    ("resnet110-row-linear", "ResNet-110 trunk, row mode, linear decay to p = 0.5"),
]


def main(folder: str = "benchmarks/results") -> None:
    names: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for key, title in ORDER:
        path = Path(folder) / f"{key}.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        rows[title] = {}
        for r in report["results"]:
            if r["name"] not in names:
                names.append(r["name"])
            rows[title][r["name"]] = f"{r['ratio']:.3f}"
        rows[title]["eval"] = f"{report['eval']['ratio']:.3f}"
        mem = {r["name"]: r["memory_ratio_to_mask_multiply"] for r in report["results"]}
        best = "Residual auto" if "Residual auto" in mem else "Residual"
        rows[title]["memory"] = f"{mem[best]:.2f}"
        rows[title]["ideal"] = f"{report['kept_fraction']:.3f}"
    cols = [*names, "eval", "ideal", "memory"]
    print("| setup | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for title, values in rows.items():
        print(f"| {title} | " + " | ".join(values.get(c, "") for c in cols) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
