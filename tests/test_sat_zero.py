"""SAT inside real DeepSpeed engines: 2 gloo ranks under ZeRO 1-3 select the same heads/channels on
every rank and as one process does, reproduce its losses, and leave omitted weights and Adam moments
bit-identical across the optimizer step."""

import pytest
import torch

from conftest import REPO, tiny_overrides
from ranks import run_ranks

STEPS = 4


def _moments(p, optimizer, step):
    from deepspeed.utils import safe_get_full_optimizer_state

    if step == 0:
        return {}  # no moments before the first step (ZeRO-1/2 also link them lazily, at that step)
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        state = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        return {k: v.clone() for k, v in state.items() if v is not None}
    return {k: v.clone() for k, v in optimizer.state.get(p, {}).items() if k in ("exp_avg", "exp_avg_sq")}


def _sat_steps(stage: int, micro: int):
    from ds_accel import runtime
    from ds_accel.config import from_dict
    from ds_accel.engine.build import make_engine, new_model, resolve_ds_config
    from ds_accel.engine.params import full_param
    from ds_accel.engine.sat import SATController
    from ds_accel.models import llama_config
    from ds_accel.sat import omitted_slices

    cfg = from_dict(tiny_overrides("/tmp/unused", optim={"micro_batch_size": micro, "weight_decay": 0.1},
                                   run={"total_steps": 2 * STEPS}, sat={"enabled": True},
                                   deepspeed={"config": str(REPO / "ds_configs" / f"zero{stage}.json")}))
    ds = resolve_ds_config(cfg, runtime.world_size())
    conf = llama_config("tiny", 512)
    engine = make_engine(new_model(conf, ds, seed=2), cfg, ds)
    sat = SATController(cfg.sat, engine.module, cfg.run.total_steps, seed=0)
    data = torch.randint(0, 512, (STEPS, 8, 32), generator=torch.Generator().manual_seed(7))
    rank = runtime.rank()
    losses, keeps, frozen, moved = [], [], [], []
    for step in range(STEPS):
        assert sat.begin_step(step) == 0.5
        keeps.append(({k: v.tolist() for k, v in sat.keep_heads.items()},
                      {k: v.tolist() for k, v in sat.keep_channels.items()}))
        x = data[step, rank * micro:(rank + 1) * micro]
        with sat.omitting():
            loss = engine(input_ids=x, labels=x, use_cache=False).loss
            engine.backward(loss)
        slices = omitted_slices(engine.module, sat.keep_heads, sat.keep_channels)
        before = [(full_param(s.param), _moments(s.param, engine.optimizer, step)) for s in slices]
        with sat.guard_optimizer(engine):
            engine.step()
        sat.end_step()
        for s, (weight, moments) in zip(slices, before):
            after, after_moments = full_param(s.param), _moments(s.param, engine.optimizer, step + 1)
            frozen.append(torch.equal(after.index_select(s.dim, s.index), weight.index_select(s.dim, s.index)))
            frozen += [torch.equal(after_moments[k].index_select(s.dim, s.index), m.index_select(s.dim, s.index))
                       for k, m in moments.items()]
            moved.append((after - weight).abs().max().item())
        t = torch.tensor([loss.item()])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        losses.append(t.item() / runtime.world_size())
    engine.destroy()
    return {"losses": losses, "keeps": keeps, "frozen": frozen, "moved": max(moved)}


@pytest.fixture(scope="module")
def one_process():
    return run_ranks(_sat_steps, 1, 0, 8)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sat_under_zero_matches_one_process(one_process, stage):
    ranks = run_ranks(_sat_steps, 2, stage, 4)
    assert all(one_process["frozen"]) and len(one_process["frozen"]) > 20
    assert one_process["moved"] > 0, "kept rows did not train"
    for r in ranks:
        assert r["keeps"] == one_process["keeps"], "selection differs from one process / between ranks"
        assert all(r["frozen"]), f"an omitted weight or moment moved under ZeRO-{stage}"
        assert r["losses"] == pytest.approx(one_process["losses"], rel=2e-5)
    assert one_process["keeps"][0] != one_process["keeps"][-1], "selection never followed the scores"
