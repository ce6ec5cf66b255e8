"""Print a README benchmark table from the JSON files of a folder that `droppath bench` wrote.

Usage: python benchmarks/render.py [FOLDER] (default benchmarks/results). One row per file, in
the order of the file names; the row's title and the columns come from each report's config and
variant fields, never from display labels.
"""

import json
import sys
from pathlib import Path

KINDS = {
    "mlp": "Transformer MLP",
    "attn": "Attention",
    "conv": "ResNet-110 trunk",
    "vit": "Small ViT",
}


def title(cfg: dict) -> str:
    kind = KINDS[cfg["kind"]] if cfg["kind"] != "conv" or cfg["depth"] == 54 else "ResNet trunk"
    rate = (
        f"p = {cfg['p']} uniform" if cfg["rule"] == "uniform" else f"linear decay to p = {cfg['p']}"
    )
    compiled = ", torch.compile" if cfg.get("compile") else ""
    return f"{kind}, {cfg['mode']} mode, {rate}{compiled}"


def is_auto(variant: dict) -> bool:
    return variant["kind"] == "residual" and variant["strategy"] == "auto" and not variant["p_zero"]


def main(folder: str = "benchmarks/results") -> None:
    columns: list[str] = []
    rows: list[tuple[str, dict[str, str]]] = []
    for path in sorted(Path(folder).glob("*.json"), key=lambda p: p.name):
        report = json.loads(path.read_text())
        cells: dict[str, str] = {}
        for r in report["results"]:
            if r["name"] not in columns:
                columns.append(r["name"])
            cells[r["name"]] = f"{r['ratio']:.3f}"
        cells["eval"] = f"{report['eval']['ratio']:.3f}"
        auto = next(r for r in report["results"] if is_auto(r["variant"]))
        cells["memory"] = f"{auto['memory_ratio_to_mask_multiply']:.2f}"
        cells["ideal"] = f"{report['kept_fraction']:.3f}"
        cells["plain ms"] = f"{report['results'][0]['step_ms']:.1f}"
        rows.append((title(report["config"]), cells))
    cols = ["plain ms", *columns, "eval", "ideal", "memory"]
    print("| setup | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells.get(c, "") for c in cols) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
