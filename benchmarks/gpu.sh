#!/usr/bin/env bash
# The whole GPU check, as people train, in one run of under 8 minutes on one GPU: the tests that
# need CUDA, then `droppath bench --device cuda`:
#   - timm vit_base_patch16_224 and convnext_tiny (224 px, batch 64) through accelerate, in bf16
#     autocast (the convnet channels_last), at drop_path_rate 0.1 and 0.4, eager and compiled;
#   - the CIFAR ResNet-110 trunk (channels_last on a GPU) in batch and row mode;
#   - a transformer MLP stack, eager.
# Writes JSON and logs into the folder given (default benchmarks/results/gpu); `python
# benchmarks/render.py FOLDER` makes the table. Needs torch with CUDA, timm, pytest and scipy;
# runs from the source tree (no install).
# GPU_SH_TINY=1 runs every command on the CPU at tiny sizes (timm's test models, one repetition,
# graphs captured by torch.compile's "eager" backend instead of compiled):
# tests/integration/test_gpu_script.py does, so that the script cannot rot without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
start=$SECONDS

if [ "${GPU_SH_TINY:-0}" = 1 ]; then
  dev=cpu vit=timm:test_vit cnx=timm:test_convnext image=32 batch=2
  reps=(--reps 1 --warmup 0) creps=(--reps 1 --warmup 0 --compile-backend eager)
  stack=(--batch 4 --tokens 4 --width 64 --depth 3) r110=(--kind conv --batch 4 --depth 6)
else
  dev=cuda vit=timm:vit_base_patch16_224 cnx=timm:convnext_tiny image=224 batch=64
  reps=(--reps 15 --warmup 5) creps=(--reps 15 --warmup 6)
  stack=(--batch 256 --tokens 64 --width 384 --depth 12) r110=(--kind conv --batch 128 --depth 54)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
  timeout 45 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
fi

b() {  # name, time limit in s, then bench options
  local name=$1 limit=$2
  shift 2
  local args=(bench --device $dev --no-progress --json "$out/$name.json" "$@")
  if [ "${GPU_SH_TINY:-0}" = 1 ]; then  # one process runs them all, at the end (no GPU to wait for)
    queued=$((${queued:-0} + 1))
    printf '%s\0' "${args[@]}" >"$out/$(printf %02d $queued)-$name.args"
    return
  fi
  echo "## $name ($((SECONDS - start)) s so far)"
  timeout "$limit" $py -m droppath "${args[@]}" || echo "## $name: did not finish within ${limit} s"
}
model=(--image $image --batch $batch --autocast bfloat16)
b vit_base-p0.4-bf16 35 --model $vit "${model[@]}" -p 0.4 "${reps[@]}"
b vit_base-p0.1-bf16 35 --model $vit "${model[@]}" -p 0.1 "${reps[@]}"
b convnext_tiny-p0.4-bf16-cl 35 --model $cnx "${model[@]}" --channels-last -p 0.4 "${reps[@]}"
b convnext_tiny-p0.1-bf16-cl 35 --model $cnx "${model[@]}" --channels-last -p 0.1 "${reps[@]}"
b resnet110-batch-linear 25 "${r110[@]}" --mode batch -p 0.5 --rule linear "${reps[@]}"
b resnet110-row-linear 25 "${r110[@]}" --mode row -p 0.5 --rule linear "${reps[@]}"
b mlp-row-p0.5-linear 25 --kind mlp "${stack[@]}" -p 0.5 --rule linear --bucket 32 "${reps[@]}"
b vit_base-p0.4-bf16-compiled 70 --model $vit "${model[@]}" -p 0.4 --compile "${creps[@]}"
b vit_base-p0.1-bf16-compiled 70 --model $vit "${model[@]}" -p 0.1 --compile "${creps[@]}"
b convnext_tiny-p0.4-bf16-cl-compiled 70 --model $cnx "${model[@]}" --channels-last -p 0.4 \
  --compile "${creps[@]}"
if [ "${GPU_SH_TINY:-0}" = 1 ]; then
  $py - "$out" <<'PY'
import pathlib, sys
from droppath.apps.cli import main
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.args")):
    name = path.stem.partition("-")[2]
    print(f"## {name}", flush=True)
    if main(path.read_bytes().decode().split("\0")[:-1]) != 0:
        sys.exit(f"## {name}: failed")
    path.unlink()
PY
fi
echo "## done in $((SECONDS - start)) s"
