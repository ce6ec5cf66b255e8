"""Two versions of droppath, interleaved: the README's rows timed with each, round after round.

    git worktree add /tmp/old COMMIT
    python benchmarks/versions_ab.py /tmp/old/src src --rounds 3 --out benchmarks/results/ab

Each round runs ``droppath bench`` once per README row with each version's source first on
``PYTHONPATH`` (the order of the versions alternating from round to round), so that both meet the
machine in the same state. Every bench run times its variants interleaved step by step itself;
this prints, per row and version, the median over the rounds of droppath's ratio to the row's
baseline and of its ``p=0`` ratio. Needs the real-library environment (timm, transformers).
Fewer repetitions per run than ``run_readme.sh`` (``--reps``), more runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROWS = {
    "vit_small": "--model timm:vit_small_patch16_224 --image 96 --batch 32 -p 0.5",
    "dinov3_vit": "--model transformers:dinov3_vit --image 96 --batch 32 -p 0.5",
    "convnext_tiny": "--model timm:convnext_tiny --image 64 --batch 16 -p 0.5",
    "llama": "--kind llama -p 0.5 --rule uniform",
    "mlp-row": "--kind mlp --batch 64 --tokens 32 --width 192 --depth 12 -p 0.5 --rule linear",
    "resnet110-batch": "--kind conv --batch 32 --depth 54 -p 0.5 --rule linear --mode batch",
}


def _ours(report: dict) -> tuple[float, float]:
    """droppath's ratio to the baseline, and its p=0 ratio."""
    ratio = zero = float("nan")
    for r in report["results"]:
        v = r["variant"]
        ours = v["kind"] in ("accelerate", "layer_drop") or (
            v["kind"] == "residual" and v["strategy"] == "auto"
        )
        if ours and v["p_zero"]:
            zero = r["ratio"]
        elif ours:
            ratio = r["ratio"]
    return ratio, zero


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("old", help="the first version's src folder")
    parser.add_argument("new", help="the second version's src folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--out", default="benchmarks/results/ab")
    args = parser.parse_args()
    versions = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    found: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for i in range(args.rounds):
        order = list(versions) if i % 2 == 0 else list(reversed(versions))
        for row in args.rows:
            for name in order:
                out = Path(args.out) / name / f"{row}-{i}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, PYTHONPATH=versions[name])
                cmd = [sys.executable, "-m", "droppath", "bench", "--no-progress", "--threads"]
                cmd += ["2", "--reps", str(args.reps), "--warmup", "2", "--json", str(out)]
                subprocess.run([*cmd, *ROWS[row].split()], env=env, check=True, capture_output=True)
                where = subprocess.run(
                    [sys.executable, "-c", "import droppath; print(droppath.__file__)"],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
                assert where.startswith(versions[name]), (where, versions[name])
                found.setdefault((row, name), []).append(_ours(json.loads(out.read_text())))
                print(f"round {i} {row} {name}: {found[(row, name)][-1]}", flush=True)
    print(f"\nmedians over {args.rounds} rounds, load {os.getloadavg()[0]:.2f}")
    print(f"{'row':18s} {'old':>7s} {'new':>7s}   {'old p=0':>7s} {'new p=0':>7s}")
    for row in args.rows:
        med = {
            name: [statistics.median(v[k] for v in found[(row, name)]) for k in (0, 1)]
            for name in versions
        }
        print(
            f"{row:18s} {med['old'][0]:7.3f} {med['new'][0]:7.3f}   "
            f"{med['old'][1]:7.3f} {med['new'][1]:7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
