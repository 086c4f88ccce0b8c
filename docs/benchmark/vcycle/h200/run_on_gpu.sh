#!/bin/bash
# How h200/ was produced: this script ran from the repository root of a copy of the working tree on the lent
# GPU machine (no network there), with .gpu/whl holding wheels of the packages its image lacks (deepspeed
# 0.19.8, datasets, hjson, pydantic and their needs) and .gpu/cache a copy of ~/.cache/ds_accel (the KJV
# and its tokenizer). Two calls:
#   STUDY_TIMEOUT=520 bash run_on_gpu.sh                                      -> budget1/
#   SCALES=0.25 JOBS=16 METHODS=dense,dense-small,vcycle,vcycle+transfer,vcycle+warmup,vcycle-share25,vcycle-alpha0.25 \
#     STUDY_TIMEOUT=320 bash run_on_gpu.sh                                    -> budget0.25/
# (results.json was then written without the per-step rows, as vcycle-study now writes it.)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD DS_ACCEL_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed, transformers; print(torch.__version__, deepspeed.__version__, transformers.__version__)"
date
timeout "${STUDY_TIMEOUT:-500}" python3 -m ds_accel.cli vcycle-study --out runs/vcycle_gpu --budget-scales ${SCALES:-1} \
  --seeds 3 --jobs ${JOBS:-15} --dtype fp32 --methods ${METHODS:-dense,vcycle,vcycle+warmup,vcycle-share25,vcycle-alpha0.25} \
  > $OUT/study_log.txt 2>&1
echo "study exit $?"; date
grep -v WARN $OUT/study_log.txt | tail -30
tar czf $OUT/vcycle_gpu.tgz --exclude=checkpoints --exclude=monitor --exclude=loss.png --exclude=train.log runs/vcycle_gpu
