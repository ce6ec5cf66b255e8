#!/usr/bin/env bash
# Re-create the README's table "real models, original vs accelerate": one `droppath bench --model`
# run per line, with 1 and 2 threads, JSON beside it. Needs timm (the `real` extra: see the
# README's "Development"). `python benchmarks/render.py benchmarks/results/models` prints it.
set -euo pipefail
out=${1:-benchmarks/results/models}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; droppath bench --no-progress --json "$out/$name.json" "$@"; echo; }
for t in 2 1; do
  b vit_small-p0.5-t$t  --model timm:vit_small_patch16_224 --image 96 --batch 32 -p 0.5 --threads $t --reps 20 --warmup 3
  b vit_small-p0.1-t$t  --model timm:vit_small_patch16_224 --image 96 --batch 32 -p 0.1 --threads $t --reps 20 --warmup 3
  b vit_small-p0-t$t    --model timm:vit_small_patch16_224 --image 96 --batch 32 -p 0   --threads $t --reps 20 --warmup 3
  b convnext_tiny-p0.5-t$t --model timm:convnext_tiny --image 64 --batch 16 -p 0.5 --threads $t --reps 20 --warmup 3
done
