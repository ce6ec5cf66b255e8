#!/usr/bin/env bash
# The low-rate grid of strategy "auto" (issue #17): uniform p = 0.02, 0.05 and 0.1 on the MLP and
# attention stacks at widths 64 and 384, and on the ResNet-110 trunk (base width 16) and a
# 4-times-wider trunk (64), row mode. Each run times plain, the mask-multiply, and Residual with
# the mask, the subset and auto, interleaved; `python benchmarks/auto_check.py DIR` then compares
# auto with the faster of the mask and the subset in every file of DIR.
set -euo pipefail
out=${1:-benchmarks/results/lowrate}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; droppath bench --no-progress --json "$out/$name.json" "$@"; echo; }
for p in 0.02 0.05 0.1; do
  for w in 64 384; do
    b "mlp-w$w-p$p"  --kind mlp  --batch 64 --tokens 32 --width "$w" --depth 12 -p "$p" --rule uniform --reps 20
    b "attn-w$w-p$p" --kind attn --batch 64 --tokens 32 --width "$w" --depth 12 -p "$p" --rule uniform --reps 20
  done
  b "resnet110-w16-p$p" --kind conv --batch 32 --depth 54 --width 16 -p "$p" --rule uniform --mode row --reps 10
  b "resnet110-w64-p$p" --kind conv --batch 32 --depth 54 --width 64 -p "$p" --rule uniform --mode row --reps 6
done
