#!/usr/bin/env bash
# Three families that accelerate reaches by deriving their blocks (issue: reach by construction):
# timm pvt_v2_b1 and caformer_s18, transformers DINOv3 ViT-S/16 (its default config), image 96,
# batch 32, drop_path_rate 0.5, original vs accelerate, paired ratios, JSON beside. Needs the
# `real` extra. `python benchmarks/render.py benchmarks/results/reach` prints the table; each
# ratio is to be read against its row's kept fraction (the ideal).
set -euo pipefail
out=${1:-benchmarks/results/reach}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; droppath bench --no-progress --json "$out/$name.json" "$@"; echo; }
b pvt_v2_b1-p0.5 --model timm:pvt_v2_b1 --image 96 --batch 32 -p 0.5 --threads 2 --reps 20 --warmup 2
b caformer_s18-p0.5 --model timm:caformer_s18 --image 96 --batch 32 -p 0.5 --threads 2 --reps 20 --warmup 2
b dinov3_vit-p0.5 --model transformers:dinov3_vit --image 96 --batch 32 -p 0.5 --threads 2 --reps 20 --warmup 2
