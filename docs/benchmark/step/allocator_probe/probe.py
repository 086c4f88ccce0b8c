"""Does keeping freed memory (``ds_accel.runtime.keep_freed_memory``) change the CPU step, dense and SAT?

One Llama-2-7B decoder layer at 2,048 tokens, the step benchmark's step (``step_bench.bench_shape``:
forward, backward, the trainer's fused AdamW; policy ``adam``; dense and r = 0.25 / 0.5 interleaved,
a warm-up then ``REPS`` repetitions, medians). Each setting runs in a process of its own (glibc's
setting is per process and not undone), the two settings alternating, ``ROUNDS`` rounds, so drift in
the machine's speed hits both. Per process: kernel (system) CPU time and minor page faults.

    .venv/bin/python docs/benchmark/step/allocator_probe/probe.py > docs/benchmark/step/allocator_probe/probe.txt
"""
import json
import os
import resource
import subprocess
import sys

ROUNDS, REPS = 2, 3


def child() -> None:
    import torch

    from ds_accel import runtime, step_bench

    applied = runtime.keep_freed_memory()
    torch.set_num_threads(runtime.usable_cores())
    shape = step_bench.catalogue()["llama2-7b-layer-2048"]
    result = step_bench.bench_shape(shape, [0.25, 0.5], REPS, torch.device("cpu"), torch.float32, policies=("adam",))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"keep_freed_memory": applied, "rates": result["adam"], "system_s": usage.ru_stime,
                      "user_s": usage.ru_utime, "minor_faults": usage.ru_minflt, "max_rss_gb": usage.ru_maxrss / 2**20}))


def main() -> None:
    rows = []
    for rnd in range(ROUNDS):
        for keep in ("0", "1"):
            env = {**os.environ, "DS_ACCEL_KEEP_FREED_MEMORY": keep}
            out = subprocess.run([sys.executable, __file__, "child"], env=env, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({"round": rnd, **row}), flush=True)
    print()
    print("| freed memory | round | dense step (s) | r = 0.25 | r = 0.5 | kernel CPU s | minor faults (M) | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(rows):
        r = row["rates"]
        print(f"| {'kept' if row['keep_freed_memory'] else 'unmapped (glibc default)'} | {i // 2} "
              f"| {r['0.25']['dense_ms'] / 1e3:.1f} | {r['0.25']['sat_ms'] / 1e3:.1f} s, {r['0.25']['measured_speedup']:.2f}x "
              f"| {r['0.5']['sat_ms'] / 1e3:.1f} s, {r['0.5']['measured_speedup']:.2f}x | {row['system_s']:.0f} "
              f"| {row['minor_faults'] / 1e6:.1f} | {row['max_rss_gb']:.1f} |")


if __name__ == "__main__":
    child() if sys.argv[1:] == ["child"] else main()
