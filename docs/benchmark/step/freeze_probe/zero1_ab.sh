#!/bin/bash
# The ZeRO-1 bookkeeping share of `freeze` (step_bench.zero1_bookkeeping: `ds-accel train`, small preset, SAT r = 0.5,
# 2 ranks, 30 steps) before stop 26's freeze changes (BASE, a worktree of 8e27043) and after (HEAD), three runs
# each, alternating. PYTHONPATH makes the ranks import each tree's ds_accel rather than the editable install's.
#   git worktree add /tmp/base 8e27043 && BASE=/tmp/base HEAD_TREE=$PWD bash docs/benchmark/step/freeze_probe/zero1_ab.sh
for i in 1 2 3; do  # each pair: before, then after
  for tree in "$BASE" "$HEAD_TREE"; do
    (cd "$tree" && PYTHONPATH="$tree" "$HEAD_TREE/.venv/bin/python" -c "
from pathlib import Path
from ds_accel.step_bench import zero1_bookkeeping
r = zero1_bookkeeping(Path('/tmp/zero1_ab/$(basename "$tree")_$i'), 'freeze')
print('$tree', $i, f\"bookkeeping {r['bookkeeping_s']:.2f} s of {r['wall_s']:.1f} s ({r['share']:.2%})\")
" 2>&1 | grep bookkeeping)
  done
done
