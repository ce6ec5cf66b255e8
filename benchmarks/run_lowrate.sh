#!/usr/bin/env bash
# The low-rate grid of strategy "auto" (issue #17): uniform p = 0.02, 0.05 and 0.1, row mode, on
# 12-block MLP and attention stacks at widths 64 (batch 64, 32 tokens) and 384 (batch 32, 16
# tokens, to keep a step near half a second on 2 cores), and on the ResNet-110 trunk (batch 32).
# Each run times plain, the mask-multiply and Residual with the mask, the subset and auto,
# interleaved; `python benchmarks/auto_check.py DIR` compares auto with the faster of the mask and
# the subset in every file of DIR (these and run_all.sh's).
set -euo pipefail
out=${1:-benchmarks/results/lowrate}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; droppath bench --no-progress --json "$out/$name.json" "$@"; echo; }
narrow=(--batch 64 --tokens 32 --width 64 --depth 12 --reps 20)
wide=(--batch 32 --tokens 16 --width 384 --depth 12 --reps 20)
for p in 0.02 0.05 0.1; do
  b "mlp-w64-p$p"   --kind mlp  "${narrow[@]}" -p "$p" --rule uniform
  b "attn-w64-p$p"  --kind attn "${narrow[@]}" -p "$p" --rule uniform
  b "mlp-w384-p$p"  --kind mlp  "${wide[@]}" -p "$p" --rule uniform
  b "attn-w384-p$p" --kind attn "${wide[@]}" -p "$p" --rule uniform
  b "resnet110-p$p" --kind conv --batch 32 --depth 54 -p "$p" --rule uniform --mode row --reps 10
done
