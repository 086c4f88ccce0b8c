"""Where the SAT step's time goes on a GPU: one Llama-2-7B decoder layer at 4,096 tokens a sequence, bf16.

``python docs/benchmark/gpu/probe_7b_layer.py --out DIR`` (on the CUDA machine) writes ``DIR/probe.json``
and ``DIR/probe.txt``:

1. The step benchmark's measurement (``step_bench.bench_shape``: dense and SAT at omission rate 0.5
   under the ``adam`` and ``freeze`` policies, interleaved rounds) at 1, 2 and 4 sequences a micro-batch.
   A speedup that rises with the micro-batch means a fixed per-step cost (host work, the optimizer over
   the full tensors) that more tokens dilute.
2. A torch profile of one dense and one SAT (``adam``, r = 0.5) step at 1 sequence: wall time, the GPU's
   busy time (kernels' own time), the optimizer's kernels, and the top kernels.
3. The two ways a sliced weight's gradient goes back to the full weight: ``index_select``'s own backward
   (``index_add_``) and the gather-once function's ``index_copy_`` (``omit.slice_directly``): each scatter
   alone on the 7B layer's weights, and the whole SAT step (``adam``, r = 0.5) with either, in
   interleaved rounds, at 1 and 4 sequences (``--small-ab``: on the ``small`` preset instead, 25 rounds).

``--device cpu --tiny`` runs the same code on a small layer (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ds_accel import step_bench
from ds_accel.config import OptimConfig
from ds_accel.engine.build import adamw
from ds_accel.sat import omit
import importlib

omit_module = importlib.import_module("ds_accel.sat.omit")
from ds_accel.sat.omit import resolve


def layer_shape(batch: int, tiny: bool) -> step_bench.Shape:
    conf = copy.deepcopy(step_bench.catalogue()["llama2-7b-layer-4096"].config)
    seq = 4096
    if tiny:
        conf.hidden_size, conf.intermediate_size, conf.num_attention_heads, conf.num_key_value_heads = 256, 688, 8, 8
        conf.head_dim, seq = 32, 256
    return step_bench.Shape(f"llama2-7b-layer-{seq}-b{batch}", conf, batch, seq, False)


def scaling(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    out = {}
    for batch in (1, 2, 4):
        shape = layer_shape(batch, tiny)
        res = step_bench.bench_shape(shape, [0.5], 5, device, dtype)
        out[str(batch)] = {pol: {k: v["0.5"][k] for k in ("dense_ms", "sat_ms", "measured_speedup",
                                                         "speedup_range", "flops_limit_speedup")}
                           for pol, v in res.items()}
        print(f"batch {batch}: " + ", ".join(f"{p} {v['measured_speedup']:.2f}x "
                                             f"(dense {v['dense_ms']:.1f} ms, SAT {v['sat_ms']:.1f} ms)"
                                             for p, v in out[str(batch)].items()), flush=True)
    return out


def profiled(device: torch.device, dtype: torch.dtype, tiny: bool) -> tuple[dict, str]:
    shape = layer_shape(1, tiny)
    model, data = step_bench._build(shape, device, dtype)
    optimizer = adamw(model, OptimConfig(lr=1e-4))
    keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")

    def step(sat: bool) -> None:
        if sat:
            with omit(model, keep_heads, keep_channels, selection=resolve(model, keep_heads, keep_channels)):
                model(data).backward()
        else:
            model(data).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    figures, text = {}, []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, sat in (("dense", False), ("sat adam r=0.5", True)):
        for _ in range(3):  # warm-up: kernels chosen, optimizer state made
            step(sat)
        step_bench._synchronize(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step(sat)
            host_s = time.perf_counter() - start  # until the host has issued the step's work
            step_bench._synchronize(device)
            wall_s = time.perf_counter() - start
        events = prof.key_averages()
        # the GPU-side events, less the optimizer's annotation ("Optimizer.step#AdamW.step" spans its kernels)
        kernels = [e for e in events if e.device_type.name == "CUDA" and not e.key.startswith("Optimizer.step")]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3
        optim = sum(e.self_device_time_total for e in kernels if "adam" in e.key.lower()) / 1e3
        by_ops = sum(e.self_device_time_total for e in events if e.device_type.name == "CPU") / 1e3
        figures[name] = {"wall_ms": wall_s * 1e3, "host_issue_ms": host_s * 1e3, "gpu_busy_ms": busy,
                         "gpu_ms_by_launching_op": by_ops, "adamw_kernels_ms": optim}
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        text += [f"== {name}: wall {wall_s * 1e3:.2f} ms, host issued its work in {host_s * 1e3:.2f} ms, "
                 f"GPU busy {busy:.2f} ms (AdamW kernels {optim:.2f} ms)", events.table(sort_by=sort, row_limit=18)]
        print(text[-2], flush=True)
    return figures, "\n".join(text)


def scatters(device: torch.device, dtype: torch.dtype, tiny: bool) -> dict:
    """Milliseconds per scatter of a half-kept weight's gradient, summed over the layer's seven weights."""
    shape = layer_shape(1, tiny)
    conf = shape.config
    h, m = conf.hidden_size, conf.intermediate_size
    weights = [((h, h), 0)] * 3 + [((h, h), 1), ((m, h), 0), ((m, h), 0), ((h, m), 1)]  # q k v o gate up down
    out = {"index_add_": 0.0, "index_copy_": 0.0}
    for (rows, cols), dim in weights:
        size = (rows, cols)[dim]
        index = torch.randperm(size, device=device)[: size // 2].sort().values
        grad = torch.randn(*((size // 2, cols) if dim == 0 else (rows, size // 2)), device=device, dtype=dtype)
        for name in out:
            for rep in range(6):
                step_bench._synchronize(device)
                start = time.perf_counter()
                getattr(grad.new_zeros(rows, cols), name)(dim, index, grad)
                step_bench._synchronize(device)
                if rep >= 1:
                    out[name] += (time.perf_counter() - start) * 1e3 / 5
    print(f"scatters over the layer's weights: " + ", ".join(f"{k} {v:.3f} ms" for k, v in out.items()), flush=True)
    return out


def direct_ab(device: torch.device, dtype: torch.dtype, tiny: bool, rounds: int = 9,
              batches: tuple = (1, 4)) -> dict:
    """SAT step (``adam``, r = 0.5) with ``index_select`` slices against the gather-once function; a batch
    "small" is the step benchmark's ``small`` preset (a whole 6M-parameter model, launch-bound on a GPU)."""
    original = omit_module.slice_directly
    out = {}
    for batch in batches:
        shape = step_bench.catalogue()["small"] if batch == "small" else layer_shape(batch, tiny)
        model, data = step_bench._build(shape, device, dtype)
        if batch == "small":
            run = lambda: model(input_ids=data, labels=data, use_cache=False).loss  # noqa: E731
        else:
            run = lambda: model(data)  # noqa: E731
        optimizer = adamw(model, OptimConfig(lr=1e-4))
        keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
        times: dict[str, list[float]] = {"index_select (index_add_)": [], "gather-once (index_copy_)": []}

        def step(direct: bool) -> float:
            omit_module.slice_directly = lambda *a: direct
            step_bench._synchronize(device)
            start = time.perf_counter()
            with omit(model, keep_heads, keep_channels, selection=resolve(model, keep_heads, keep_channels)) as sl:
                run().backward()
            assert sl.direct == direct
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_bench._synchronize(device)
            return (time.perf_counter() - start) * 1e3

        try:
            for rep in range(rounds + 2):
                for name, direct in zip(times, (True, False)):
                    t = step(direct)
                    if rep >= 2:
                        times[name].append(t)
        finally:
            omit_module.slice_directly = original
        ratios = [a / b for a, b in zip(*times.values())]
        out[str(batch)] = {**{k: statistics.median(v) for k, v in times.items()},
                           "index_select_over_gather_once": statistics.median(ratios),
                           "range": [min(ratios), max(ratios)]}
        print(f"batch {batch}: " + json.dumps(out[str(batch)]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--small-ab", action="store_true", help="only the direct / gather-once A/B on the small preset")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    if args.small_ab:
        result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                  "direct_ab": direct_ab(device, dtype, args.tiny, rounds=25, batches=("small",))}
        (args.out / "small_ab.json").write_text(json.dumps(result, indent=1))
        return
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "scaling": scaling(device, dtype, args.tiny)}
    result["scatters_ms"] = scatters(device, dtype, args.tiny)
    result["direct_ab"] = direct_ab(device, dtype, args.tiny)
    (args.out / "probe.json").write_text(json.dumps(result, indent=1))  # kept if the profile fails
    result["profile"], text = profiled(device, dtype, args.tiny)
    (args.out / "probe.json").write_text(json.dumps(result, indent=1))
    (args.out / "probe.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
