#!/usr/bin/env bash
# The whole GPU check, in one run of under 8 minutes on one GPU: the tests that need CUDA, then
# `droppath bench --device cuda` on a transformer MLP stack, the CIFAR ResNet-110 trunk (batch and
# row mode) and a small ViT, each eager and under torch.compile. Writes JSON and logs into the
# folder given (default benchmarks/results/gpu); `python benchmarks/render.py FOLDER` makes the
# README table. Needs torch with CUDA, pytest and scipy; runs from the source tree (no install).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
start=$SECONDS

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
timeout 100 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt"

b() {  # name, time limit in s, then bench options
  local name=$1 limit=$2
  shift 2
  echo "## $name ($((SECONDS - start)) s so far)"
  timeout "$limit" $py -m droppath bench --device cuda --no-progress --json "$out/$name.json" "$@" \
    || echo "## $name: did not finish within ${limit} s"
}
mlp=(--kind mlp --batch 256 --tokens 64 --width 384 --depth 12 -p 0.5 --rule linear --reps 30 --bucket 32)
vit=(--kind vit --batch 256 --width 384 --depth 12 -p 0.5 --rule linear --reps 20 --bucket 32)
r110=(--kind conv --batch 128 --depth 54 -p 0.5 --rule linear --reps 15)
b mlp-row-p0.5-linear 35 "${mlp[@]}"
b vit-row-p0.5-linear 35 "${vit[@]}"
b resnet110-batch-linear 35 "${r110[@]}" --mode batch
b resnet110-row-linear 35 "${r110[@]}" --mode row
b mlp-row-p0.5-linear-compiled 60 "${mlp[@]}" --compile --warmup 6
b vit-row-p0.5-linear-compiled 60 "${vit[@]}" --compile --warmup 6
b resnet110-batch-linear-compiled 60 "${r110[@]}" --mode batch --compile --warmup 6
echo "## done in $((SECONDS - start)) s"
