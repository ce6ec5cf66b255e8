"""Print a README benchmark table from the JSON files of a folder that `droppath bench` wrote.

Usage: python benchmarks/render.py [FOLDER] (default benchmarks/results). One row per file, ordered
by kind, mode, rate and rule; the row's title and the columns come from each report's config and
variant fields, never from display labels.
"""

import json
import sys
from pathlib import Path

KINDS = {
    "mlp": "Transformer MLP",
    "attn": "Attention",
    "vit": "Small ViT",
    "conv": "ResNet-110 trunk",
    "llama": "Llama, 8 layers",
    "model": "a library's model",
}


def title(cfg: dict) -> str:
    if cfg["kind"] == "model":  # a timm, torchvision or transformers model: its own rates
        threads = f", {cfg['threads']} thread(s)" if cfg.get("threads") else ""
        return (
            f"{cfg['model']}, image {cfg['image']}, batch {cfg['batch']}, "
            f"drop_path_rate = {cfg['p']}{threads}"
        )
    kind = KINDS[cfg["kind"]] if cfg["kind"] != "conv" or cfg["depth"] == 54 else "ResNet trunk"
    rate = (
        f"p = {cfg['p']} uniform" if cfg["rule"] == "uniform" else f"linear decay to p = {cfg['p']}"
    )
    compiled = ", torch.compile" if cfg.get("compile") else ""
    threads = f", {cfg['threads']} thread(s)" if cfg.get("threads") else ""
    return f"{kind}, {cfg['mode']} mode, {rate}{compiled}{threads}"


def order(report: dict) -> tuple:
    """Rows by kind, then mode, rate, rule, eager before compiled, threads."""
    cfg = report["config"]
    kinds = list(KINDS)
    return (
        kinds.index(cfg["kind"]),
        cfg.get("model") or "",
        cfg["mode"] not in ("row", None),
        -cfg["p"],
        cfg["rule"] or "",
        bool(cfg.get("compile")),
        cfg.get("threads") or 0,
    )


def is_droppath(variant: dict) -> bool:
    """droppath's default way: Residual's auto strategy, layer_drop, or accelerate."""
    ours = variant["kind"] in ("layer_drop", "accelerate") or (
        variant["kind"] == "residual" and variant["strategy"] == "auto"
    )
    return ours and not variant["p_zero"]


def main(folder: str = "benchmarks/results") -> None:
    columns: list[str] = []
    rows: list[tuple[str, dict[str, str]]] = []
    reports = [json.loads(p.read_text()) for p in Path(folder).glob("*.json")]
    for report in sorted(reports, key=order):
        cells: dict[str, str] = {}
        for r in report["results"]:
            if r["name"] not in columns:
                columns.append(r["name"])
            cells[r["name"]] = f"{r['ratio']:.3f}"
        cells["eval"] = f"{report['eval']['ratio']:.3f}"
        ours = next(r for r in report["results"] if is_droppath(r["variant"]))
        cells["memory"] = f"{ours['memory_ratio_to_mask_multiply']:.2f}"
        cells["ideal"] = f"{report['kept_fraction']:.3f}"
        baseline = f"{report['results'][0]['name']} ms"  # plain, or a library model's original
        cells[baseline] = f"{report['results'][0]['step_ms']:.1f}"
        rows.append((title(report["config"]), cells))
    baselines = [f"{c} ms" for c in ("plain", "original") if any(f"{c} ms" in r for _, r in rows)]
    cols = [*baselines, *columns, "eval", "ideal", "memory"]
    print("| setup | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells.get(c, "") for c in cols) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
