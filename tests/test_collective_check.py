"""The collective checker of tests/collective_check.py: it must flag, on CPU, exactly the collectives
that would get a host tensor (or a dtype NCCL lacks) on a CUDA machine, and pass DeepSpeed's own.

Each case runs one collective under a checker whose scope is this file (so tensors made here are
tracked as ds_accel's are) and reads whether it added a violation."""

from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from ranks import run_ranks

HERE = Path(__file__)


def _flagged(check, collective) -> list[str]:
    """The problems one collective call adds to ``check`` (gloo itself refuses some dtypes NCCL lacks: int16)."""
    before = len(check.violations)
    try:
        collective()
    except RuntimeError as err:
        assert "Invalid scalar type" in str(err)
    return [v.problem for v in check.violations[before:]]


def _provenance_cases() -> dict[str, list[str]]:
    import torch.distributed as dist

    from collective_check import CollectiveCheck
    from ds_accel import runtime

    dev = runtime.device()
    with CollectiveCheck(scope=[HERE]) as check:
        host = torch.tensor([1.0, 2.0])
        placed = torch.tensor([1.0, 2.0], device=dev)
        cases = {
            "factory without device": lambda: dist.all_reduce(host),
            "factory with device=runtime.device()": lambda: dist.all_reduce(placed),
            "moved with .to(runtime.device())": lambda: dist.all_reduce(host.to(dev)),
            "host tensor after its .to() copy was taken": lambda: dist.all_reduce(host),
            "computed from host tensors only": lambda: dist.all_reduce(torch.cat([host * 2, host.sum()[None]])),
            "computed from a device tensor and a host tensor": lambda: dist.all_reduce(placed + host),
            "factory on a host tensor's device": lambda: dist.all_reduce(torch.zeros(2, device=host.device)),
            "factory with device='cpu'": lambda: dist.all_reduce(torch.zeros(2, device="cpu")),
            "like-factory of a device tensor": lambda: dist.all_reduce(torch.zeros_like(placed)),
            ".cpu() of a device tensor": lambda: dist.all_reduce(placed.cpu()),
            "device tensor after its .cpu() copy was taken": lambda: dist.all_reduce(placed),
            "in-place write of host values into a device tensor": lambda: dist.all_reduce(placed.copy_(host)),
            "broadcast of a host tensor": lambda: dist.broadcast(host, src=0),
            "all_gather into host outputs": lambda: dist.all_gather([torch.empty(2)], placed),
            "int16 on the device": lambda: dist.all_reduce(torch.zeros(2, dtype=torch.int16, device=dev)),
            "bool all_reduce": lambda: dist.all_reduce(torch.zeros(2, dtype=torch.bool, device=dev)),
            "bool broadcast": lambda: dist.broadcast(torch.zeros(2, dtype=torch.bool, device=dev), src=0),
            "complex all_reduce (sent as real pairs)": lambda: dist.all_reduce(torch.zeros(2, dtype=torch.complex64,
                                                                                           device=dev)),
            "all_gather_object (exempt)": lambda: dist.all_gather_object([None] * dist.get_world_size(), host),
        }
        return {name: _flagged(check, case) for name, case in cases.items()}


def test_checker_flags_host_tensors_and_nccl_dtypes_only(monkeypatch):
    monkeypatch.setenv("DS_ACCEL_COLLECTIVE_CHECK", "0")  # no run_ranks checker around the one under test
    result = run_ranks(_provenance_cases, 1)[0]
    host = {"factory without device", "host tensor after its .to() copy was taken", "computed from host tensors only",
            "factory on a host tensor's device", "factory with device='cpu'", ".cpu() of a device tensor",
            "broadcast of a host tensor", "all_gather into host outputs"}
    dtype = {"int16 on the device", "bool all_reduce"}
    for name, problems in result.items():
        if name in host:
            assert len(problems) == 1 and "host tensor made at tests/test_collective_check.py" in problems[0], name
        elif name in dtype:
            assert len(problems) == 1 and ("NCCL has no type" in problems[0] or "bool" in problems[0]), name
        else:
            assert problems == [], (name, problems)


def _host_tensor_from_the_package():
    import torch.distributed as dist

    from ds_accel.models import initial_value, llama_config

    dist.all_reduce(initial_value("model.norm.weight", torch.Size([8]), llama_config("tiny", 512), seed=0))


@pytest.mark.distributed
def test_run_ranks_fails_on_a_host_tensor_made_in_ds_accel():
    """The wiring: every ``run_ranks`` worker checks its collectives with ds_accel as the scope."""
    with pytest.raises(Exception, match=r"all_reduce at tests/test_collective_check.py:\d+.*ds_accel/models.py"):
        run_ranks(_host_tensor_from_the_package, 2)


def _deepspeed_steps() -> dict:
    """ZeRO-1 and ZeRO-3 engine steps under a fresh checker (scope: ds_accel): every collective DeepSpeed
    runs (parameter broadcast, gradient reduction, ZeRO-3 gathers and reduce-scatters) is checked."""
    from collective_check import CollectiveCheck
    from ds_accel import runtime
    from ds_accel.config import from_dict
    from ds_accel.engine.build import make_engine, new_model, resolve_ds_config
    from ds_accel.models import llama_config

    result = {}
    for stage in (1, 3):
        cfg = from_dict(tiny_overrides("/tmp/unused", optim={"micro_batch_size": 2},
                                       deepspeed={"config": str(REPO / "ds_configs" / f"zero{stage}.json")}))
        with CollectiveCheck() as check:
            ds = resolve_ds_config(cfg, runtime.world_size())
            engine = make_engine(new_model(llama_config("tiny", 512), ds, seed=0), cfg, ds)
            x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(runtime.rank()))
            for _ in range(2):
                engine.backward(engine(input_ids=x.to(runtime.device()), labels=x.to(runtime.device())).loss)
                engine.step()
            engine.destroy()
        result[stage] = {"calls": check.calls, "violations": [str(v) for v in check.violations]}
    return result


@pytest.mark.distributed
def test_deepspeed_internal_collectives_pass():
    for rank in run_ranks(_deepspeed_steps, 2):
        for stage, checked in rank.items():
            assert checked["calls"] > 0 and checked["violations"] == [], (stage, checked)
