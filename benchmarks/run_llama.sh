#!/usr/bin/env bash
# Re-create the README's layer-drop table: `droppath bench --kind llama` (needs transformers: run
# with the real-library environment of the README's Development section), JSON beside it. The
# compiled line (torch.compile, droppath under draw_ahead) has no torchtune column: its LayerDropout
# does not compile on a Hugging Face Llama.
set -euo pipefail
out=${1:-benchmarks/results/llama}
bin=${DROPPATH_BIN:-.venv-real/bin}
mkdir -p "$out"
b() { name=$1; shift; echo "## $name"; "$bin/droppath" bench --kind llama --no-progress --json "$out/$name.json" "$@"; echo; }
b llama-row-p0.5-uniform -p 0.5 --rule uniform --reps 12
b llama-row-p0.5-linear -p 0.5 --rule linear --reps 12
b llama-row-p0.5-uniform-1thread -p 0.5 --rule uniform --reps 12 --threads 1
b llama-row-p0.5-uniform-compiled -p 0.5 --rule uniform --reps 12 --warmup 3 --compile
