"""The ``freeze`` guard's write-back of omitted columns: ``index_copy_`` along dim 1 against ``scatter_`` with the
column index expanded over the rows (a view: no index tensor over the whole weight), and of omitted rows, where
``index_copy_`` along dim 0 stays. Half of the ``small`` preset's 688 MLP channels (down_proj's columns, gate/up's
rows) and half of its 256 attention columns (o_proj), fp32, 2 threads; microseconds per call, median of 7 runs of
300 calls after 20 warm-up calls, one warm tensor (in a training step the tensors are cold, so larger).

    .venv/bin/python docs/benchmark/step/freeze_probe/writeback_micro.py > docs/benchmark/step/freeze_probe/writeback_micro.txt
"""
import statistics
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


print("| weight | omitted | index_select (the snapshot) | index_copy_ | scatter_ |\n|---|---|---|---|---|")
for shape, dim in (((256, 688), 1), ((256, 256), 1), ((688, 256), 0)):
    weight = torch.randn(shape)
    index = torch.randperm(shape[dim])[:shape[dim] // 2].sort().values
    saved = weight.index_select(dim, index)
    expanded = index.expand(shape[0], -1) if dim == 1 else index[:, None].expand(-1, shape[1])
    cells = [per_call_us(lambda: weight.index_select(dim, index)),
             per_call_us(lambda: weight.index_copy_(dim, index, saved)),
             per_call_us(lambda: weight.scatter_(dim, expanded, saved))]
    what = "columns" if dim else "rows"
    print(f"| {shape[0]} x {shape[1]} | {len(index)} {what} | " + " | ".join(f"{c:.0f} us" for c in cells) + " |")
