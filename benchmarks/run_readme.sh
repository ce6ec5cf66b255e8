#!/usr/bin/env bash
# Re-measure the README's table of measured savings, its six rows in one run, JSON beside each:
# `accelerate` on timm ViT-S and ConvNeXt-T and on transformers' DINOv3, `layer_drop` on Llama,
# `Residual` on the MLP stack (row mode) and the ResNet-110 trunk (batch mode). Needs timm and
# transformers: run it with the real-library environment's `droppath` on PATH (the README's
# Development section), then `python benchmarks/render.py benchmarks/results/readme`.
# The other scripts (run_all.sh, run_models.sh, ...) measure these setups among many others.
# More repetitions for the two noisiest rows: DINOv3 (30) and batch mode, whose step time varies
# with how many blocks a draw skips (40).
set -euo pipefail
out=${1:-benchmarks/results/readme}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; droppath bench --no-progress --threads 2 --json "$out/$name.json" "$@"; echo; }
b vit_small-p0.5      --model timm:vit_small_patch16_224 --image 96 --batch 32 -p 0.5 --reps 20 --warmup 3
b dinov3_vit-p0.5     --model transformers:dinov3_vit --image 96 --batch 32 -p 0.5 --reps 30 --warmup 2
b convnext_tiny-p0.5  --model timm:convnext_tiny --image 64 --batch 16 -p 0.5 --reps 20 --warmup 3
b llama-row-p0.5-uniform --kind llama -p 0.5 --rule uniform --reps 12
b mlp-row-p0.5-linear --kind mlp --batch 64 --tokens 32 --width 192 --depth 12 -p 0.5 --rule linear --reps 30
b resnet110-batch-linear --kind conv --batch 32 --depth 54 -p 0.5 --rule linear --mode batch --reps 40
