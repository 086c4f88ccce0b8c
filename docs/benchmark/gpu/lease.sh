#!/bin/bash
# One lent GPU call, from the repository root of a copy of the working tree on the device machine (no
# network there): `bash docs/benchmark/gpu/lease.sh`, with .gpu/ filled here first by prepare_lease.sh
# (beside this file): .gpu/whl holds wheels of what the machine's image lacks (deepspeed built with
# DS_BUILD_OPS=0, datasets, hjson, pydantic, pydantic_core, annotated-types, typing-inspection, dill,
# multiprocess, megatron-core), .gpu/cache a copy of
# ~/.cache/ds_accel (the KJV, its tokenizers and packed tokens). PARTS (default "check megatron") picks
# what runs, in order: check (gpu-check's report and log under $OUT), megatron (the Megatron check's
# JSON and log), offload (gpu-check under ZeRO-2 with and without offload, in $OUT/offload).
# $OUT/machine.txt has the versions and each part's exit code. Each part has its own time limit, so
# one that hangs leaves the others their time.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD DS_ACCEL_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, deepspeed, transformers, pyarrow, huggingface_hub as h; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'hub', h.__version__)" 2>&1 | grep -v WARN
  date -u
} > "$OUT/machine.txt"
for part in ${PARTS:-check megatron}; do
  case $part in
    check)  # the sliced check, the step benchmark and ZeRO-1 launches
      timeout "${CHECK_TIMEOUT:-330}" python3 -m ds_accel.cli gpu-check --out "$OUT" --runs runs/gpu_check \
        --stages "${STAGES:-1}" --methods "${METHODS:-dense,vcycle+sat}" > "$OUT/log.txt" 2>&1 ;;
    megatron)
      timeout "${MEGATRON_TIMEOUT:-170}" python3 -m ds_accel.megatron.gpu_check --out "$OUT/megatron.json" \
        > "$OUT/megatron_log.txt" 2>&1 ;;
    offload)  # ZeRO-2 with and without the optimizer in host memory, no step benchmark
      mkdir -p "$OUT/offload"
      timeout "${OFFLOAD_TIMEOUT:-330}" python3 -m ds_accel.cli gpu-check --no-step-bench --out "$OUT/offload" \
        --runs runs/gpu_offload --stages 2,2_offload --methods dense,vcycle+sat > "$OUT/offload_log.txt" 2>&1 ;;
  esac
  echo "$part exit $? at $(date -u +%T)" >> "$OUT/machine.txt"
done
cat "$OUT/machine.txt"
