"""Process set-up on CPU (ds_accel.runtime): threads from the affinity, freed memory kept."""
import json
import os
import subprocess
import sys
import warnings

import pytest

# In a fresh process, 16 "steps" that each make four large tensors (64, 86, 32 and 64 MiB, as a step's
# activations and gradients) and free them; per step: minor page faults (pages the kernel hands out
# afresh) and resident memory after the frees, as JSON.
_PROBE = """
import json, os, resource, sys, torch
from ds_accel import runtime
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
rows = []
for step in range(16):
    before = faults()
    tensors = [torch.ones(mib << 18) for mib in (64, 86, 32, 64)]
    del tensors
    rows.append((faults() - before, rss_mb()))
print(json.dumps({"applied": applied, "rows": rows}))
"""
_STEP_MIB = 64 + 86 + 32 + 64


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DS_ACCEL_KEEP"))}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_freed_memory_stops_faulting_pages_in_and_stops_growing():
    """glibc's default unmaps each freed tensor above 32 MiB, so every step faults all 246 MiB of its
    large tensors in again; with ``keep_freed_memory`` the heap keeps them. It grows for the first few
    steps (its fragments: glibc's aligned allocations can't reuse a free chunk of exactly their size;
    here 3 steps, and in about a third of the runs once more, 42 MiB at the 7th), then stops: the last
    8 steps together fault in less than 5% of what one default step does and the heap no longer grows,
    at less than 3 steps' worth of tensors over the default. (Faults relative to the default's own
    count, so that a kernel that backs them with transparent huge pages, fewer and larger faults, is
    judged alike.)"""
    default = _probe("default")["rows"]
    per_step = min(faults for faults, _ in default)  # 4 KiB pages: ~63,000; with THP "always" far fewer
    assert per_step > 0, default
    keep = _probe("keep")
    rows = keep["rows"]
    assert keep["applied"] is True
    assert sum(faults for faults, _ in rows[8:]) < 0.05 * per_step, (rows, default)
    assert rows[-1][1] - rows[7][1] < _STEP_MIB / 16, f"the heap still grows: {rows}"
    assert rows[-1][1] - default[-1][1] < 3 * _STEP_MIB, f"kept memory beyond 3 steps' tensors: {rows}"


def test_keep_freed_memory_leaves_a_users_own_malloc_settings_alone():
    assert _probe("keep", MALLOC_ARENA_MAX="2")["applied"] is False
    assert _probe("keep", DS_ACCEL_KEEP_FREED_MEMORY="0")["applied"] is False


def test_a_pinned_process_sizes_its_threads_from_its_affinity():
    """Runs pinned to one core each (or a SLURM cpuset) take one thread, not the machine's core count."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from ds_accel.runtime import setup_process; import torch; setup_process(1); "
            "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.stdout.split()[-2:] == ["1", "1"]


def test_cpu_description_names_the_model_and_torch_s_vector_instructions():
    """The step benchmark records it: figures (and float32 rounding) differ between CPUs that look alike."""
    import torch

    from ds_accel import runtime

    name, capability = runtime.cpu_description().rsplit(", ", 1)
    assert name and capability == torch.backends.cpu.get_cpu_capability()


def test_no_tf32_turns_tf32_off_and_restores_what_was_set():
    import torch

    from ds_accel import runtime

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with runtime.no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_host_syncs_counts_cuda_sync_warnings(monkeypatch):
    """runtime.host_syncs: off CUDA it only runs the function (None); on CUDA it counts the warnings of
    torch's sync debug mode, switched on for the call and off after it, also when the function raises.
    CUDA's side is imitated here (set_sync_debug_mode and synchronize are recorded, the warnings issued by
    hand, worded as torch words them)."""
    import torch

    from ds_accel import runtime

    ran = []
    assert runtime.host_syncs(lambda: ran.append(1), torch.device("cpu")) is None and ran == [1]
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def two_waits():
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
        warnings.warn("called a synchronizing CUDA operation")

    assert runtime.host_syncs(two_waits, torch.device("cuda")) == 2 and modes == ["warn", "default"]
    with pytest.raises(ZeroDivisionError):
        runtime.host_syncs(lambda: 1 / 0, torch.device("cuda"))
    assert modes[-1] == "default"
