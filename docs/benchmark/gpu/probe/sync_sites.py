"""Where a whole ZeRO-1 bf16 engine step makes the host wait for the GPU: the Megatron GPU check's engine
step (``ds_accel.megatron.gpu_check._engine``, ``base`` preset, seq 1024, batch 8), with each of CUDA's
sync-debug warnings attributed to the innermost ds_accel / DeepSpeed / transformers / torch.optim frames
that issued it. Prints one JSON object: {run: {"syncs": n, "sites": {call chain: count}}}.

Run on a CUDA machine from the repository root (docs/benchmark/gpu/lease.sh's environment). Calls 3 and 4
of 2026-11-28 ran it when the counter lived in ``ds_accel.sliced_check`` (it patched that); it is
``ds_accel.runtime.host_syncs`` since.
"""

import collections
import json
import traceback
import warnings

import torch

from ds_accel import runtime
from ds_accel.megatron import gpu_check, init_parallel

KEEP = ("/ds_accel/", "/deepspeed/", "/transformers/", "/torch/optim/")


def _site() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if any(k in f.filename for k in KEEP)]
    return " <- ".join(f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno} {f.name}" for f in frames[::-1][:4])


def main() -> None:
    init_parallel(1)
    result = {}
    for backend, rate in (("hf", 0.0), ("hf", 0.5), ("megatron", 0.5)):
        sites: collections.Counter = collections.Counter()

        def recording(fn, device):
            torch.cuda.synchronize(device)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = lambda message, *args, **kwargs: (
                    sites.update([_site()]) if "synchroniz" in str(message) else None)
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return sum(sites.values())

        runtime.host_syncs = recording
        run = gpu_check._engine(backend, "base", 1024, 8, rate, 3, 40)
        result[f"{backend}_rate{rate}"] = {"syncs": run["host_syncs_per_step"], "sites": dict(sites.most_common())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
