"""Print a benchmark table, and draw its plot, from the JSON files that `droppath bench` wrote.

Usage: python benchmarks/render.py [FOLDER] [--plot PNG] (FOLDER defaults to benchmarks/results).
One row per file, ordered by kind, mode, rate and rule; the row's title and the columns come from
each report's config and variant fields, never from display labels. With --plot, also write a PNG
(matplotlib, imported only then): per setup, the step time of the libraries' formulation and of
droppath's over the baseline, against the ideal (the kept work: measured in FLOPs for a library
model, else the mean kept fraction of the sites), and droppath's activation memory over the
libraries'. The docs' benchmark page shows these plots.
"""

import argparse
import json
import textwrap
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
            f"drop_path_rate = {cfg['p']}{_how(cfg)}{threads}"
        )
    kind = KINDS[cfg["kind"]] if cfg["kind"] != "conv" or cfg["depth"] == 54 else "ResNet trunk"
    rate = (
        f"p = {cfg['p']} uniform" if cfg["rule"] == "uniform" else f"linear decay to p = {cfg['p']}"
    )
    threads = f", {cfg['threads']} thread(s)" if cfg.get("threads") else ""
    return f"{kind}, {cfg['mode']} mode, {rate}{_how(cfg)}{threads}"


def _how(cfg: dict) -> str:
    """How the steps ran, where it is not the default: autocast, channels_last, compiled."""
    parts = [
        f", {cfg['autocast']} autocast" if cfg.get("autocast") else "",
        ", channels_last" if cfg.get("channels_last") else "",
        ", torch.compile" if cfg.get("compile") else "",
    ]
    return "".join(parts)


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
        cfg.get("autocast") or "",
        cfg.get("threads") or 0,
    )


def is_droppath(variant: dict) -> bool:
    """droppath's default way: Residual's auto strategy, layer_drop, or accelerate."""
    ours = variant["kind"] in ("layer_drop", "accelerate") or (
        variant["kind"] == "residual" and variant["strategy"] == "auto"
    )
    return ours and not variant["p_zero"]


def is_library_way(variant: dict) -> bool:
    """The formulation droppath is compared with: timm's mask-multiply, torchtune's layer drop.
    A library model's own (``original``) is the baseline itself."""
    return variant["kind"] in ("mask-multiply", "torchtune")


def memory_baseline(cfg: dict) -> str:
    """What `droppath bench` measures activation memory against (its report's own choice)."""
    return {"model": "original", "llama": "plain"}.get(cfg["kind"], "mask-multiply")


def load(folder: str) -> list[dict]:
    """The reports of ``folder``, in table order."""
    return sorted((json.loads(p.read_text()) for p in Path(folder).glob("*.json")), key=order)


def table(reports: list[dict]) -> str:
    """The Markdown table: one row per report, a column per variant."""
    columns: list[str] = []
    rows: list[tuple[str, dict[str, str]]] = []
    for report in reports:
        cells: dict[str, str] = {}
        for r in report["results"]:
            if r["name"] not in columns:
                columns.append(r["name"])
            cells[r["name"]] = f"{r['ratio']:.3f}"
        cells["eval"] = f"{report['eval']['ratio']:.3f}"
        ours = next(r for r in report["results"] if is_droppath(r["variant"]))
        cells["memory"] = f"{ours['memory_ratio_to_mask_multiply']:.2f}"
        cells["ideal"] = f"{report['kept_fraction']:.3f}"
        if "kept_work" in report:  # a library model's: the FLOPs droppath's step keeps
            cells["kept work"] = f"{report['kept_work']:.3f}"
        baseline = f"{report['results'][0]['name']} ms"  # plain, or a library model's original
        cells[baseline] = f"{report['results'][0]['step_ms']:.1f}"
        rows.append((title(report["config"]), cells))
    baselines = [f"{c} ms" for c in ("plain", "original") if any(f"{c} ms" in r for _, r in rows)]
    work = ["kept work"] if any("kept work" in r for _, r in rows) else []
    cols = [*baselines, *columns, "eval", "ideal", *work, "memory"]
    lines = ["| setup | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
    return "\n".join(lines)


def plot(reports: list[dict], path: str) -> None:
    """Two panels, one row per setup: step time over the baseline (the libraries' way and
    droppath's, bars; the ideal, a mark), and droppath's activation memory over the libraries'."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = [textwrap.fill(title(r["config"]), 46) for r in reports]
    ours = [next(v for v in r["results"] if is_droppath(v["variant"])) for r in reports]
    theirs = [
        next((v for v in r["results"] if is_library_way(v["variant"])), None) for r in reports
    ]
    pair = any(theirs)  # two bars per setup: the libraries' way above droppath's
    baseline = reports[0]["results"][0]["name"]  # plain, or a library model's original
    y = list(range(len(reports)))[::-1]  # the table's first row on top
    ours_y = [i - 0.2 for i in y] if pair else y
    fig, (ax_time, ax_mem) = plt.subplots(
        1,
        2,
        figsize=(11, 1.4 + 0.6 * len(reports)),
        sharey=True,
        gridspec_kw={"width_ratios": [3, 2]},
    )
    if pair:
        name = next(v["name"] for v in theirs if v)
        ratios = [v["ratio"] if v else 0 for v in theirs]
        ax_time.barh([i + 0.2 for i in y], ratios, 0.4, color="#bbbbbb", label=name)
    ax_time.barh(
        ours_y, [v["ratio"] for v in ours], 0.4 if pair else 0.6, color="#1f77b4", label="droppath"
    )
    ideal = [r.get("kept_work", r["kept_fraction"]) for r in reports]
    ax_time.scatter(
        ideal,
        ours_y,
        marker="|",
        s=400,
        linewidths=2.5,
        color="black",
        zorder=3,
        label="ideal (the kept work)",
    )
    for i, v, k in zip(ours_y, ours, ideal, strict=True):
        ax_time.text(max(v["ratio"], k) + 0.012, i, f"{v['ratio']:.2f}", va="center", fontsize=8)
    ax_time.axvline(1.0, color="black", linewidth=0.8)
    ax_time.set_xlabel(f"training step time / {baseline}'s (lower is faster)")
    ax_time.set_yticks(y, labels, fontsize=8)
    ax_time.set_xlim(0, max(1.15, *(v["ratio"] * 1.08 for v in ours)))
    memory = [v["memory_ratio_to_mask_multiply"] for v in ours]
    ax_mem.barh(y, memory, 0.6, color="#2ca02c")
    for i, m in zip(y, memory, strict=True):
        ax_mem.text(m + 0.02, i, f"{m:.2f}", va="center", fontsize=8)
    ax_mem.axvline(1.0, color="black", linewidth=0.8)
    ax_mem.set_xlim(0, 1.25)
    ax_mem.set_xlabel(f"droppath's activation memory / {memory_baseline(reports[0]['config'])}'s")
    machine = reports[0]["machine"]
    where = machine.get("gpu") or f"{machine['cpu_count']}-core CPU"
    fig.text(0.99, 0.99, f"{where}, torch {machine['torch']}", fontsize=9, ha="right", va="top")
    handles, names = ax_time.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper left", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (1.4 + 0.6 * len(reports))))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="benchmarks/results")
    parser.add_argument("--plot", metavar="PNG", help="also write the plot to this file")
    args = parser.parse_args(argv)
    reports = load(args.folder)
    if not reports:
        parser.error(f"no JSON results in {args.folder}")
    print(table(reports))
    if args.plot:
        plot(reports, args.plot)


if __name__ == "__main__":
    main()
