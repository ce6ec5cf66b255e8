#!/usr/bin/env bash
# Re-create the README's CPU table: each line is one `droppath bench` run, JSON beside it.
# `python benchmarks/render.py` prints the table; run_llama.sh and gpu.sh make the other two.
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; droppath bench --no-progress --json "$out/$name.json" "$@"; echo; }
b mlp-row-p0.5-uniform  --kind mlp --batch 64 --tokens 32 --width 192 --depth 12 -p 0.5 --rule uniform --reps 30 --bucket 16
b mlp-row-p0.5-linear   --kind mlp --batch 64 --tokens 32 --width 192 --depth 12 -p 0.5 --rule linear --reps 30 --bucket 16
b mlp-row-p0.5-linear-compiled --kind mlp --batch 64 --tokens 32 --width 192 --depth 12 -p 0.5 --rule linear --reps 20 --warmup 5 --compile --bucket 16
b mlp-row-p0.1-uniform  --kind mlp --batch 64 --tokens 32 --width 192 --depth 12 -p 0.1 --rule uniform --reps 30
b attn-row-p0.5-linear  --kind attn --batch 64 --tokens 32 --width 192 --depth 12 -p 0.5 --rule linear --reps 30
b resnet110-batch-linear --kind conv --batch 32 --depth 54 -p 0.5 --rule linear --mode batch --reps 12
b resnet110-row-linear   --kind conv --batch 32 --depth 54 -p 0.5 --rule linear --mode row --reps 12
