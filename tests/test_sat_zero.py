"""SAT inside real DeepSpeed engines, 2 gloo ranks under ZeRO 0-3 (and ZeRO-Offload at 2-3), against an
independent reference.

The reference is plain torch in float64, one process, no ds_accel code on the path: the dense model with
the omitted units' outputs multiplied by zero (a mask on the o_proj / down_proj input), the whole global
batch, torch's AdamW, and for the ``freeze`` policy a brute-force snapshot and write-back of the omitted
rows/columns of every weight and moment. Each step uses the selection the DeepSpeed run made.

What is asserted, per ZeRO stage:
- both ranks select the same units, as one process does;
- the ``freeze`` policy: the omitted rows/columns of every weight and both Adam moments are bit-identical
  across every step, in the gathered full tensors;
- every parameter (1-D norms included) and both moments after the steps equal the reference to float32
  accuracy. The run is float32 and sums gradients over ranks and micro-batches in another order; Adam
  divides by sqrt(v) + eps, which amplifies an absolute gradient error d up to lr * d / (4 eps) (the
  derivative of g / (|g| + eps) peaks at |g| = eps), so the size of "float32 accuracy" is measured rather
  than guessed: the same reference run in float32 (plain torch, one process) deviates from the float64
  one by some e_w (weights, in units of lr; ~0.03 here) and e_m (moments, relative to their largest
  entry; ~3e-4). The DeepSpeed run must stay within 2 e_w and 2 e_m. A wrong row, a missed micro-batch or
  an update applied to an omitted unit is an error of order lr (1 in these units), or 1 in the moments.
"""

import pytest
import torch

from conftest import REPO, tiny_overrides
from ranks import run_ranks

STEPS, ACCUM, MICRO, VOCAB, LR = 3, 2, 2, 512, 3e-3
MOMENTS = ("exp_avg", "exp_avg_sq")


def _data(world: int) -> torch.Tensor:
    """[step, rank, micro-step, sequence, token]: the same global batches (2 * MICRO sequences per
    micro-step) split over ``world`` ranks."""
    tokens = torch.randint(0, VOCAB, (STEPS, ACCUM, 2 * MICRO, 32), generator=torch.Generator().manual_seed(7))
    return tokens.view(STEPS, ACCUM, world, 2 * MICRO // world, 32).transpose(1, 2)


def _full_state(engine, stepped: bool = True):
    """Every parameter and both Adam moments (none before the first step: ZeRO-1/2 link them at that
    step), gathered, float64 (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from ds_accel.ds_private import link_optimizer_state
    from ds_accel.engine.params import full_param
    from ds_accel.engine.sat import inner_optimizer

    if stepped and hasattr(engine.optimizer, "bit16_groups"):  # ZeRO-1/2: see link_optimizer_state
        link_optimizer_state(engine.optimizer)
    out = {}
    for name, p in engine.module.named_parameters():
        if not stepped:
            moments = [None, None]
        elif hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            moments = [safe_get_full_optimizer_state(p, k) for k in MOMENTS]
        else:
            state = inner_optimizer(engine.optimizer).state.get(p, {})
            moments = [state.get(k) for k in MOMENTS]
        out[name] = [full_param(p).double()] + [None if m is None else m.double().clone() for m in moments]
    return out


def _sat_steps(stage: int, policy: str, offload: bool = False):
    from ds_accel import runtime
    from ds_accel.config import from_dict
    from ds_accel.engine.build import make_engine, new_model, resolve_ds_config
    from ds_accel.engine.sat import SATController
    from ds_accel.models import llama_config

    world, rank = runtime.world_size(), runtime.rank()
    ds_json = REPO / "ds_configs" / f"zero{stage}{'_offload' if offload else ''}.json"
    cfg = from_dict(tiny_overrides("/tmp/unused", optim={"micro_batch_size": MICRO * 2 // world, "grad_accum": ACCUM,
                                                         "weight_decay": 0.1, "lr": LR, "grad_clip": 0.0},
                                   run={"total_steps": 2 * STEPS},
                                   sat={"enabled": True, "optimizer_policy": policy},
                                   deepspeed={"config": str(ds_json)}))
    ds = resolve_ds_config(cfg, world)
    engine = make_engine(new_model(llama_config("tiny", VOCAB), ds, seed=2), cfg, ds)
    # ZeRO-1/2's and ZeRO-3's optimizers each took their offload path (or not)
    assert getattr(engine.optimizer, "cpu_offload", getattr(engine.optimizer, "offload_optimizer", False)) == offload
    sat = SATController(cfg.sat, engine.module, cfg.run.total_steps, seed=0, micro_batches=ACCUM)
    sat.attach(engine.optimizer)
    data = _data(world)
    keeps, frozen, losses = [], [], []
    for step in range(STEPS):
        assert sat.begin_step(step) == 0.5
        keeps.append(({k: v.tolist() for k, v in sat.keep_heads.items()},
                      {k: v.tolist() for k, v in sat.keep_channels.items()}))
        before = _full_state(engine, stepped=step > 0)
        loss = 0.0
        with sat.omitting():
            for micro in range(ACCUM):
                x = data[step, rank, micro]
                micro_loss = engine(input_ids=x, labels=x, use_cache=False).loss
                engine.backward(micro_loss)
                engine.step()
                loss += micro_loss.item() / ACCUM
        sat.end_step()
        after = _full_state(engine)
        losses.append(loss)
        if policy == "freeze":
            for s in sat.omitted():
                name = next(n for n, p in engine.module.named_parameters() if p is s.param)
                for old, new in zip(before[name], after[name]):
                    if old is not None:
                        frozen.append(torch.equal(old.index_select(s.dim, s.index), new.index_select(s.dim, s.index)))
    final = _full_state(engine)
    engine.destroy()
    return {"keeps": keeps, "frozen": frozen, "losses": losses, "final": final if rank == 0 else None}


def _omitted_rows(conf, keep_heads: list[int] | None, keep_channels: list[int] | None) -> dict[str, tuple]:
    """By hand: parameter suffix -> (dim, omitted indices) of one layer's selection."""
    hd, groups = conf.hidden_size // conf.num_attention_heads, conf.num_attention_heads // conf.num_key_value_heads
    rows = lambda units: [u * hd + i for u in units for i in range(hd)]
    out = {}
    if keep_heads is not None:
        q = rows(sorted(set(range(conf.num_attention_heads)) - set(keep_heads)))
        kv = rows(sorted(set(range(conf.num_key_value_heads)) - {h // groups for h in keep_heads}))
        out |= {"self_attn.q_proj.weight": (0, q), "self_attn.o_proj.weight": (1, q),
                "self_attn.k_proj.weight": (0, kv), "self_attn.v_proj.weight": (0, kv)}
    if keep_channels is not None:
        c = sorted(set(range(conf.intermediate_size)) - set(keep_channels))
        out |= {"mlp.gate_proj.weight": (0, c), "mlp.up_proj.weight": (0, c), "mlp.down_proj.weight": (1, c)}
    return out


def _reference(keeps, policy: str, dtype: torch.dtype = torch.float64):
    """Plain torch float64: masked dense model, global batch, AdamW, brute-force freeze."""
    from ds_accel.models import build_model, initial_value, llama_config

    conf = llama_config("tiny", VOCAB)
    model = build_model(conf).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, p.shape, conf, 2))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    params = dict(model.named_parameters())
    hd = conf.hidden_size // conf.num_attention_heads
    data, losses = _data(1), []
    for step, (keep_heads, keep_channels) in enumerate(keeps):
        hooks = []
        for layer_index, layer in enumerate(model.model.layers):
            if layer_index in keep_heads:
                mask = torch.zeros(conf.hidden_size, dtype=dtype)
                for h in keep_heads[layer_index]:
                    mask[h * hd:(h + 1) * hd] = 1
                hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, mask=mask: a[0] * mask))
            if layer_index in keep_channels:
                mask = torch.zeros(conf.intermediate_size, dtype=dtype)
                mask[keep_channels[layer_index]] = 1
                hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, mask=mask: a[0] * mask))
        opt.zero_grad()
        loss = 0.0
        for micro in range(ACCUM):
            x = data[step, 0, micro]
            micro_loss = sum(model(input_ids=half, labels=half).loss for half in x.split(MICRO)) / (2 * ACCUM)
            micro_loss.backward()
            loss += micro_loss.item()
        for hook in hooks:
            hook.remove()
        saved = []
        if policy == "freeze":
            for layer_index in range(conf.num_hidden_layers):
                omitted = _omitted_rows(conf, keep_heads.get(layer_index), keep_channels.get(layer_index))
                for suffix, (dim, index) in omitted.items():
                    p = params[f"model.layers.{layer_index}.{suffix}"]
                    index = torch.tensor(index, dtype=torch.long)
                    tensors = [p] + [opt.state[p][k] for k in MOMENTS if p in opt.state]
                    saved += [(t, dim, index, t.detach().index_select(dim, index).clone()) for t in tensors]
        opt.step()
        with torch.no_grad():
            for t, dim, index, values in saved:
                t.index_copy_(dim, index, values)
        losses.append(loss)
    final = {name: [p.detach()] + [opt.state[p].get(k) for k in MOMENTS] for name, p in params.items()}
    return losses, final


def _errors(final, reference) -> tuple[float, float]:
    """(largest weight error in units of lr, largest moment error relative to that moment's largest entry)."""
    weight_error = moment_error = 0.0
    for name, (weight, *moments) in reference.items():
        got_weight, *got_moments = final[name]
        weight_error = max(weight_error, (got_weight.double() - weight).abs().max().item() / LR)
        for got, want in zip(got_moments, moments):
            moment_error = max(moment_error, (got.double() - want).abs().max().item() / want.abs().max().item())
    return weight_error, moment_error


def _compare(final, keeps, policy: str) -> None:
    """The run against the float64 reference, within twice float32's own deviation from it (module doc)."""
    reference = _reference(keeps, policy)[1]
    float32_weights, float32_moments = _errors(_reference(keeps, policy, torch.float32)[1], reference)
    assert float32_weights < 0.1 and float32_moments < 1e-3, "the float32 reference itself is far off"
    weights, moments = _errors(final, reference)
    assert weights <= 2 * float32_weights, (weights, float32_weights)
    assert moments <= 2 * float32_moments, (moments, float32_moments)


@pytest.fixture(scope="module")
def one_process():
    return run_ranks(_sat_steps, 1, 0, "freeze")[0]


@pytest.mark.distributed
@pytest.mark.parametrize("stage,offload", [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)],
                         ids=["zero0", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"])
def test_freeze_policy_under_zero_matches_the_reference(one_process, stage, offload):
    """``offload``: ZeRO-Offload (ds_configs/zero{2,3}_offload.json): the master weights and moments are
    stepped in host memory, and the guard saves and restores their omitted part there."""
    ranks = run_ranks(_sat_steps, 2, stage, "freeze", offload)
    for r in ranks:
        assert r["keeps"] == one_process["keeps"], "selection differs from one process / between ranks"
        assert all(r["frozen"]) and len(r["frozen"]) > 40, f"an omitted weight or moment moved under ZeRO-{stage}"
    assert one_process["keeps"][0] != one_process["keeps"][-1], "selection never followed the scores"
    losses, _ = _reference(ranks[0]["keeps"], "freeze")
    assert [sum(r["losses"][i] for r in ranks) / 2 for i in range(STEPS)] == pytest.approx(losses, rel=1e-5)
    _compare(ranks[0]["final"], ranks[0]["keeps"], "freeze")


@pytest.mark.distributed
def test_adam_policy_under_zero1_matches_stock_adamw():
    """No guard: omitted rows move as stock AdamW moves rows with a zero gradient (decay, momentum)."""
    ranks = run_ranks(_sat_steps, 2, 1, "adam")
    rank0 = ranks[0]
    losses, reference = _reference(rank0["keeps"], "adam")
    assert [sum(r["losses"][i] for r in ranks) / 2 for i in range(STEPS)] == pytest.approx(losses, rel=1e-5)
    _compare(rank0["final"], rank0["keeps"], "adam")
    _, frozen_reference = _reference(rank0["keeps"], "freeze")
    moved = max((reference[n][0] - frozen_reference[n][0]).abs().max().item() for n in reference)
    assert moved > 0.1 * LR, "the two policies should differ on omitted rows"
