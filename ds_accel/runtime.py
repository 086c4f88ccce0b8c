"""Process set-up: accelerator choice, thread pinning, DeepSpeed's process group, clean exit.

On a machine without CUDA the tool selects DeepSpeed's CPU accelerator with gloo itself, gives
each rank its share of the cores, keeps freed memory in the process (:func:`keep_freed_memory`),
and (unless DS_ACCEL_SHM_OP=1) skips the JIT build of the shared-memory allreduce op, which costs
~20 s per fresh machine and only speeds up large CPU all-reduces. A single process without a
launcher gets a one-rank process group, so the same engine code runs under ``python`` and under
the ``deepspeed`` launcher.
"""

from __future__ import annotations

import os
import platform
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_core_ids() -> list[int]:
    """Cores this process may run on: its CPU affinity (``taskset``, a SLURM cpuset), not the machine's
    cores, so that ranks or runs pinned to a share of a node don't oversubscribe it."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(usable_core_ids())


@contextmanager
def no_tf32() -> Iterator[None]:
    """float32 GEMMs and convolutions in float32 on CUDA (TF32 would round both sides of a float32 comparison
    to 10 bits), the previous settings restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """How many times ``fn`` made the host wait for the device (CUDA's sync debug mode warns at each
    synchronising call: ``.item()``, ``nonzero``, a copy to the host); None off CUDA, which has no such
    mode. A wait per layer would leave the GPU idle while Python issues the next layer."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def cpu_description() -> str:
    """The CPU's model name and the vector instructions torch's kernels use ("... Processor, AVX512"): a
    benchmark's figures, and float32 rounding, depend on both, and machines that look alike differ in them."""
    name = ""
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{name or platform.processor() or 'unknown CPU'}, {torch.backends.cpu.get_cpu_capability()}"


def keep_freed_memory() -> bool:
    """Serve large CPU tensors from the heap and keep what is freed: the CPU analogue of CUDA's caching
    allocator. glibc maps every allocation above its mmap threshold (which adapts up to 32 MiB at most)
    afresh and unmaps it when freed, so every step's large activations, weight slices and gradients
    fault their pages in again: a Llama-2-7B layer's step at 2,048 tokens spends seconds in the kernel
    (docs/benchmark/step/allocator_probe/). Raises the threshold to 1 GiB and never trims the heap; the
    process keeps its peak footprint, as a caching allocator does, and the heap's fragments (glibc's
    aligned allocations cannot reuse a free chunk of exactly their size) hold up to about twice a
    step's large tensors before it stops growing (tests/test_runtime.py). Skipped where the user set
    glibc's own MALLOC_* variables, with DS_ACCEL_KEEP_FREED_MEMORY=0, or off glibc; returns whether
    it applied."""
    import ctypes

    if os.environ.get("DS_ACCEL_KEEP_FREED_MEMORY", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def setup_process(local_world: int | None = None) -> None:
    """Environment for DeepSpeed on this machine; call before ``init_distributed``."""
    if on_cpu():
        os.environ["DS_ACCELERATOR"] = "cpu"
        local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        threads = max(1, usable_cores() // max(1, local_world))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        keep_freed_memory()
        if os.environ.get("DS_ACCEL_SHM_OP", "0") != "1":
            from .ds_private import skip_shm_op_build

            skip_shm_op_build()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> None:
    """DeepSpeed's process group (gloo on CPU, nccl on GPU), once per process."""
    import deepspeed
    import torch.distributed as dist

    setup_process()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl")
    if not on_cpu():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def shutdown() -> None:
    """Destroy the process group: gloo can abort at exit (SIGABRT) when it is left alive."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def peak_memory_mb() -> float:
    """Peak accelerator memory of this process (CUDA), or its peak resident set size on CPU."""
    if torch.cuda.is_available() and not on_cpu():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1
