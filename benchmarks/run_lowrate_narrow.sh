#!/usr/bin/env bash
# The narrow half of the low-rate grid (run_lowrate.sh) again, with 200 repetitions instead of 20:
# 12-block MLP and attention stacks at width 64 (batch 64, 32 tokens), uniform p = 0.02, 0.05 and
# 0.1, row mode. A step there takes about 50 ms, so ten times the repetitions fit in minutes; the
# median of 200 paired ratios spreads about a third as much as that of 20 (1 / sqrt(10)), which
# shows better whether `auto` took the faster of the mask and the subset where the two are close.
# `python benchmarks/auto_check.py benchmarks/results/lowrate-narrow` compares them.
set -euo pipefail
out=${1:-benchmarks/results/lowrate-narrow}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; droppath bench --no-progress --json "$out/$name.json" "$@"; echo; }
narrow=(--batch 64 --tokens 32 --width 64 --depth 12 --reps 200 --warmup 10)
for p in 0.02 0.05 0.1; do
  b "mlp-w64-p$p"  --kind mlp  "${narrow[@]}" -p "$p" --rule uniform
  b "attn-w64-p$p" --kind attn "${narrow[@]}" -p "$p" --rule uniform
done
