"""Process set-up on CPU (ds_accel.runtime): threads from the affinity, freed memory kept."""
import os
import subprocess
import sys

# In a fresh process: a 64 MiB tensor is made and freed, then made again; the second one's minor
# page faults (pages the kernel hands out afresh) are counted.
_PROBE = """
import resource, sys, torch
from ds_accel import runtime
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 << 20)
del x
before = faults()
x = torch.ones(16 << 20)
print(applied, faults() - before)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DS_ACCEL_KEEP"))}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    applied, faults = out.stdout.split()[-2:]
    return applied, int(faults)


def test_freed_memory_is_reused_without_faulting_pages_in_again():
    """glibc's default unmaps a freed 64 MiB tensor, so the next one faults in all its 16,384 pages;
    with ``keep_freed_memory`` the heap keeps it and the next one faults in (almost) none."""
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    applied, faults = _probe("default")
    assert faults > 0.9 * pages, f"glibc's default faulted {faults} pages in, expected about {pages}"
    applied, faults = _probe("keep")
    assert applied == "True" and faults < 0.05 * pages, (applied, faults)


def test_keep_freed_memory_leaves_a_users_own_malloc_settings_alone():
    assert _probe("keep", MALLOC_ARENA_MAX="2")[0] == "False"
    assert _probe("keep", DS_ACCEL_KEEP_FREED_MEMORY="0")[0] == "False"


def test_a_pinned_process_sizes_its_threads_from_its_affinity():
    """Runs pinned to one core each (or a SLURM cpuset) take one thread, not the machine's core count."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from ds_accel.runtime import setup_process; import torch; setup_process(1); "
            "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.stdout.split()[-2:] == ["1", "1"]
