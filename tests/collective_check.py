"""Catch, on CPU, the collectives that would get a host tensor on a CUDA machine (NCCL has no CPU tensors).

On DeepSpeed's CPU accelerator the accelerator's device *is* the CPU, so comparing ``tensor.device``
with ``get_accelerator().current_device_name()`` can never fail here. :class:`CollectiveCheck` tracks
where tensors come from instead. A ``TorchFunctionMode`` marks a tensor as *host* when code under
``ds_accel/`` (the scope: the first frame outside torch that made the call) creates it

- with a factory (any torch function without tensor arguments that returns tensors: ``torch.tensor``,
  ``zeros``, ``arange``, ``randn``, ...) and no ``device=``, or with ``device="cpu"`` or the device of
  a host tensor (``torch.zeros(n, device=host.device)``);
- with ``.cpu()``, ``.to("cpu")`` or ``.to(host_tensor)``;

and any op's outputs are host when every tensor argument is host (``host * 2``, ``torch.cat`` of host
tensors; in-place ops and ``out=`` keep their target's mark). ``.to(device)``, ``.cuda()`` and a factory
with another explicit device give a non-host tensor; as ``.to()`` returns its input unchanged when
nothing moves (always, on CPU), it returns an alias here, so ``x.to(runtime.device())`` does not unmark
``x`` itself. ds_accel names the accelerator's device with ``runtime.device()`` (a ``torch.device``);
a bare ``"cpu"`` string is read as a deliberate host placement.

Restricting the marks to ds_accel's own frames avoids the false positives a blanket rule would give:
model parameters are made by ``nn.Module`` init without a device and moved by DeepSpeed's
``module.to(device)`` (a no-op on CPU), and DeepSpeed and transformers build tensors of their own,
whose placement is theirs to get right. Their tensors are never marked; a host tensor that ds_accel
hands to DeepSpeed and DeepSpeed passes to a collective is still caught.

The wrapped ``torch.distributed`` collectives (``CHECKED``, in both ``torch.distributed`` and
``distributed_c10d``, installed before ``init_distributed`` so DeepSpeed's comm backend binds the
wrappers) record a :class:`Violation` with the call site when a tensor argument is host; when, on a
CUDA accelerator over a non-gloo group, it lives on another device than the accelerator's current
one; or when its dtype is one NCCL lacks (bool only in reductions: torch sends it as uint8 and turns
SUM into MAX; complex is sent as pairs of reals). The ``*_object`` collectives pickle Python objects through
tensors torch places itself; they are exempt, and so are the collectives they run inside.

Not caught: ``torch.from_numpy`` and ``torch.load`` results (not torch functions; ``data.py`` and
``checkpoint.py`` use them for host-side data), and ``device=torch.device("cpu")`` objects, which look
like ``runtime.device()`` on this machine.

``DS_ACCEL_COLLECTIVE_CHECK=0`` turns the check off in ``tests/ranks.py`` (to measure its overhead).
Overhead, measured 2026-11-27 on 2 ranks of the ``tiny`` model (4 x 32 tokens, median of 3 x 10 steps,
process CPU time, the machine shared with other jobs): ZeRO-1 step 36.6 -> 52.6 ms (1.44x) and 37.0 ->
50.4 ms (1.36x), ZeRO-3 139.3 -> 161.1 ms (1.16x) and 131.3 -> 146.5 ms (1.12x) on ranks 0 and 1. A
2-rank test's wall-clock is mostly process start-up and engine set-up: a 16-step ZeRO-3 V-cycle + SAT
trainer run took 88 s with the check and 88 s without (105 / 119 s in a second pair).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode

PACKAGE = Path(__file__).resolve().parents[1] / "ds_accel"
_TORCH = str(Path(torch.__file__).resolve().parent)
_THIS = str(Path(__file__).resolve())

CHECKED = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
           "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast",
           "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
           "batch_isend_irecv")
EXEMPT = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
          "send_object_list", "recv_object_list")
REDUCTIONS = {"all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
              "_reduce_scatter_base"}
# ProcessGroupNCCL's dtype map (torch/csrc/distributed/c10d): anything else raises "Input tensor data type
# is not supported for NCCL process group". bool goes as uint8, and a bool SUM is turned into MAX.
NCCL_DTYPES = {torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
               torch.float64, torch.bool, torch.float8_e5m2, torch.float8_e4m3fn, torch.float8_e4m3fnuz,
               torch.float8_e5m2fnuz}
_DEVICE_GETTER = torch._C.TensorBase.__dict__["device"]
_COMM = (os.path.join(importlib.util.find_spec("deepspeed").submodule_search_locations[0], "comm"),)
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}


@dataclass(frozen=True)
class Violation:
    collective: str
    site: str  # the first ds_accel frame of the call (or the first frame outside torch), "via" its direct caller
    problem: str

    def __str__(self) -> str:
        return f"{self.collective} at {self.site}: {self.problem}"


def _short(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    return str(Path(filename).relative_to(PACKAGE.parent)) if filename.startswith(str(PACKAGE.parent)) else filename


def _frames(skip: tuple[str, ...] = ()) -> Iterator:
    """The calling frames, innermost first, without torch's and this file's (and ``skip``'s)."""
    frame = sys._getframe()
    while frame is not None:
        if not frame.f_code.co_filename.startswith((_TORCH, _THIS, *skip)):
            yield frame
        frame = frame.f_back


def _where(frame) -> str:
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} ({frame.f_code.co_name})"


class _Provenance(TorchFunctionMode):
    """Marks host tensors (see the module docstring); ``host[id(t)] = (weakref to t, where it was made)``."""

    def __init__(self, scope: Sequence[Path]):
        super().__init__()
        self.scope = tuple(str(Path(p).resolve()) for p in scope)
        self.host: dict[int, tuple[weakref.ref, str]] = {}
        self.host_devices: dict[int, torch.device] = {}  # .device of host tensors (kept alive: ids stay unique)

    def origin(self, t: torch.Tensor) -> str | None:
        entry = self.host.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _mark(self, t: torch.Tensor, origin: str) -> None:
        key = id(t)
        self.host[key] = (weakref.ref(t, lambda ref: self.host.pop(key) if self.host.get(key, (None,))[0] is ref
                                      else None), origin)

    def _caller_in_scope(self) -> str | None:
        frame = next(_frames(), None)
        if frame is not None and frame.f_code.co_filename.startswith(self.scope):
            return _where(frame)
        return None

    def _device_is_host(self, device) -> bool | None:
        """True: a host placement; False: the accelerator's (or another explicit) device; None: not given."""
        if device is None:
            return None
        if isinstance(device, torch.Tensor):
            return self.origin(device) is not None
        if id(device) in self.host_devices and self.host_devices[id(device)] is device:
            return True
        return isinstance(device, str) and device.split(":")[0] == "cpu"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if getattr(func, "__self__", None) is _DEVICE_GETTER:
            if self.origin(args[0]) is not None:
                if len(self.host_devices) > 100_000:
                    self.host_devices.clear()
                self.host_devices[id(result)] = result
            return result
        outputs = [result] if isinstance(result, torch.Tensor) else \
            [r for r in result if isinstance(r, torch.Tensor)] if isinstance(result, (tuple, list)) else []
        if not outputs:
            return result
        inputs = [t for a in (*args, *kwargs.values()) for t in ((a,) if isinstance(a, torch.Tensor) else
                  a if isinstance(a, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
        if func in _MOVES:
            target = True if func is torch.Tensor.cpu else False if func is torch.Tensor.cuda else \
                self._device_is_host(kwargs.get("device", args[1] if len(args) > 1 and not isinstance(
                    args[1], torch.dtype) else None))
        elif "device" in kwargs and kwargs["device"] is not None:
            target = self._device_is_host(kwargs["device"])
        else:
            target = None
        if target is None:  # no placement named: a factory's output is host, other outputs follow their inputs
            if not inputs:
                origin = self._caller_in_scope()
                for out in outputs if origin is not None else ():
                    self._mark(out, f"{origin} (made without device=)")
                return result
            origins = [self.origin(t) for t in inputs]
            if all(origins):
                for out in outputs:
                    if not any(out is t for t in inputs):
                        self._mark(out, origins[0])
            return result
        origin = self._caller_in_scope() if target else None
        if target and origin is None:
            return result  # a host placement outside ds_accel: not ours to judge
        if len(outputs) == 1 and any(result is t for t in inputs) and (self.origin(result) is not None) != bool(target):
            result = outputs[0] = result.view_as(result)  # nothing moved (on CPU): an alias takes the new mark
        if target:
            for out in outputs:
                self._mark(out, f"{origin} (placed on the host)")
        return result


class CollectiveCheck:
    """Context: provenance marks plus checked ``torch.distributed`` collectives; see the module docstring.

    ``scope``: the source roots whose tensors are tracked (default: the ds_accel package). Violations
    are recorded (the collective still runs, so every rank stays in step) in ``violations``, each
    printed to stderr once; ``calls`` counts the checked collective calls.
    """

    def __init__(self, scope: Sequence[Path] = (PACKAGE,)):
        self.provenance = _Provenance(scope)
        self.violations: list[Violation] = []
        self.calls = 0
        self._depth = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> CollectiveCheck:
        wrappers = {name: self._wrap(name, getattr(c10d, name), exempt=name in EXEMPT)
                    for name in CHECKED + EXEMPT if hasattr(c10d, name)}
        for module in (dist, c10d):
            for name, wrapper in wrappers.items():
                self._saved.append((module, name, getattr(module, name, None)))
                setattr(module, name, wrapper)
        self.provenance.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.provenance.__exit__(*exc)
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _wrap(self, name: str, collective, exempt: bool):
        def checked(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            if depth == 0 and not exempt:
                self.calls += 1
                self._check(name, args, kwargs)
            self._depth.value = depth + 1
            try:
                return collective(*args, **kwargs)
            finally:
                self._depth.value = depth

        checked.__name__ = checked.__qualname__ = name
        checked.__wrapped__ = collective
        return checked

    def _check(self, name: str, args, kwargs) -> None:
        problems = []
        group = kwargs.get("group")
        for t in _tensors((*args, *kwargs.values())):
            origin = self.provenance.origin(t)
            if origin is not None:
                problems.append(f"a host tensor made at {origin}; NCCL takes only tensors on the accelerator's "
                                f"device: create it with device=runtime.device() or move it with .to(runtime.device())")
            elif not _on_accelerator(t, group):
                problems.append(f"a tensor on {t.device}, not the accelerator's current device")
            if (t.dtype.to_real() if t.is_complex() else t.dtype) not in NCCL_DTYPES:  # torch sends complex as real pairs
                problems.append(f"dtype {t.dtype}, which NCCL has no type for")
            elif t.dtype == torch.bool and name in REDUCTIONS:
                problems.append("a bool tensor in a reduction: NCCL has no bool, torch sends uint8 and turns "
                                "SUM into MAX (AVG fails); reduce a float or int tensor")
        if not problems:
            return
        frames = list(_frames(_COMM))
        in_scope = next((f for f in frames if f.f_code.co_filename.startswith(self.provenance.scope)), None)
        site = _where(in_scope or frames[0]) if frames else "?"
        if frames and in_scope is not None and frames[0] is not in_scope:
            site += f" via {_where(frames[0])}"
        for problem in dict.fromkeys(problems):
            violation = Violation(name, site, problem)
            if violation not in self.violations:
                self.violations.append(violation)
                print(f"collective check: {violation}", file=sys.stderr, flush=True)

    def report(self) -> str:
        return "\n".join(f"  {v}" for v in self.violations)


def _tensors(values) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)
        elif isinstance(v, dist.P2POp):
            yield v.tensor


def _on_accelerator(t: torch.Tensor, group) -> bool:
    """On a CUDA (non-CPU) accelerator, NCCL groups need the accelerator's current device."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" or dist.get_backend(group) == "gloo":
        return True
    return t.device == torch.device(accelerator.current_device_name())


def enabled() -> bool:
    return os.environ.get("DS_ACCEL_COLLECTIVE_CHECK", "1") != "0"
