"""Independent references of the two methods for the trainer-level tests: plain torch, one process.

No ds_accel code is on the computation's path; ds_accel supplies only what a test must share with the
run it checks (the seeded initial weights, ``ds_accel.models.initial_value``; the data order,
``ds_accel.data.BlockSampler``) and, for the V-cycle, the pure operators the test drives by hand.

- :class:`Reference`: a HF Llama trained by hand: per step the mean loss over the micro-batches,
  backward, clipping by the global gradient norm (as DeepSpeed's ``gradient_clipping``), torch's AdamW
  with matrices decayed and 1-D parameters not, at the LR the test gives for the step. SAT's computation is
  the dense model with the omitted units' outputs multiplied by zero (a mask on the o_proj / down_proj
  input), and its ``freeze`` policy a brute-force snapshot and write-back of the omitted rows / columns
  of every weight, bias and Adam moment around the step.
- :class:`HandSAT`: SAT's importance (the ``activation`` metric), its EMA, the top-k selection and the
  LORS rate, each written here from the formulas of the ds_accel.sat docstrings, on the reference's own
  activations.
- :func:`deviation`: how far a run's weights and moments are from a reference's, in the units the
  tolerance arguments use.

In float64 HF's RMSNorm still computes in float32 (it casts its input), which would put float32's
rounding into the float64 reference; :func:`rms_norm_in_input_dtype` runs the same formula in the input
dtype instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

MOMENTS = ("exp_avg", "exp_avg_sq")
ULP32 = 2.0 ** -23  # float32's relative spacing at 1: a value rounded to float32 is off by up to half of it


@contextmanager
def rms_norm_in_input_dtype() -> Iterator[None]:
    """LlamaRMSNorm's formula, g * x / sqrt(mean(x^2) + eps), in the input's dtype (see the module doc)."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    with mock.patch.object(modeling_llama.LlamaRMSNorm, "forward", forward):
        yield


def seeded_model(conf: LlamaConfig, seed: int, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model the trainer starts from (``initial_value`` per parameter), in ``dtype``."""
    from ds_accel.models import initial_value

    model = LlamaForCausalLM(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial_value(name, p.shape, conf, seed))
    return model.to(dtype)


def warmup_cosine(t: int, steps: int, warmup: int, floor: float) -> float:
    """LR over its peak at step t of a schedule of ``steps`` steps: (t + 1) / w during the w warm-up steps,
    then floor + (1 - floor) (1 + cos(pi p)) / 2 with p = (t - w) / (steps - w) (the documented schedule)."""
    if t < warmup:
        return (t + 1) / warmup
    p = (t - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def _omitted(units: list[int], n: int) -> list[int]:
    return sorted(set(range(n)) - set(units))


class Reference:
    """A HF Llama trained by hand (see the module docstring); ``optim``: the run's OptimConfig."""

    def __init__(self, model: LlamaForCausalLM, optim, dtype: torch.dtype = torch.float64):
        self.optim, self.dtype = optim, dtype
        self.restart(model)

    def restart(self, model: LlamaForCausalLM) -> None:
        """Train ``model`` from here on with a new AdamW (no state: the V-cycle's ``fresh`` policy)."""
        o = self.optim
        self.model = model.to(self.dtype).train()
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def _masks(self, keep_heads: dict, keep_channels: dict) -> list:
        """Forward pre-hooks that zero the omitted heads' o_proj input and channels' down_proj input."""
        conf, hooks = self.model.config, []
        hd = conf.hidden_size // conf.num_attention_heads
        for index, layer in enumerate(self.model.model.layers):
            for kept, module, unit, n in ((keep_heads.get(index), layer.self_attn.o_proj, hd, conf.num_attention_heads),
                                          (keep_channels.get(index), layer.mlp.down_proj, 1, conf.intermediate_size)):
                if kept is None:
                    continue
                mask = torch.zeros(n * unit, dtype=self.dtype)
                for u in kept:
                    mask[u * unit:(u + 1) * unit] = 1
                hooks.append(module.register_forward_pre_hook(lambda m, args, mask=mask: args[0] * mask))
        return hooks

    def _omitted_state(self, keep_heads: dict, keep_channels: dict) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(tensor, dim, omitted indices) for every omitted row / column of every weight, bias and moment:
        q rows of omitted heads, k/v rows of KV heads no kept head uses, o_proj columns; gate/up rows and
        down_proj columns of omitted channels."""
        conf = self.model.config
        H, K, m = conf.num_attention_heads, conf.num_key_value_heads, conf.intermediate_size
        hd = conf.hidden_size // H
        rows = lambda units: torch.tensor([u * hd + i for u in units for i in range(hd)], dtype=torch.long)
        out = []
        for index, layer in enumerate(self.model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            parts = []
            if index in keep_heads:
                q = rows(_omitted(keep_heads[index], H))
                kv = rows(_omitted(sorted({h // (H // K) for h in keep_heads[index]}), K))
                parts += [(attn.q_proj, 0, q), (attn.k_proj, 0, kv), (attn.v_proj, 0, kv), (attn.o_proj, 1, q)]
            if index in keep_channels:
                c = torch.tensor(_omitted(keep_channels[index], m), dtype=torch.long)
                parts += [(mlp.gate_proj, 0, c), (mlp.up_proj, 0, c), (mlp.down_proj, 1, c)]
            for module, dim, index_ in parts:
                if index_.numel() == 0:
                    continue
                tensors = [(module.weight, dim)]
                if module.bias is not None and dim == 0:  # o_proj / down_proj's bias is never omitted
                    tensors.append((module.bias, 0))
                for p, d in tensors:
                    state = self.optimizer.state.get(p, {})
                    out += [(t, d, index_) for t in [p, *(state[k] for k in MOMENTS if k in state)]]
        return out

    def step(self, micro_batches: list[torch.Tensor], lr: float, keep_heads: dict | None = None,
             keep_channels: dict | None = None, freeze: bool = False) -> float:
        """One optimizer step over ``micro_batches`` (each the global micro-batch, [B, T] token ids) with the
        units of ``keep_heads`` / ``keep_channels`` ({layer: kept indices}; a missing layer is dense)
        computed; ``freeze``: omitted weights and moments come out of the step unchanged. Returns the
        mean loss."""
        keep_heads, keep_channels = keep_heads or {}, keep_channels or {}
        hooks = self._masks(keep_heads, keep_channels)
        loss_sum = 0.0
        with rms_norm_in_input_dtype() if self.dtype == torch.float64 else nullcontext():
            for x in micro_batches:
                loss = self.model(input_ids=x, labels=x).loss / len(micro_batches)
                loss.backward()
                loss_sum += loss.item()
        for hook in hooks:
            hook.remove()
        if self.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        saved = []
        if freeze:
            saved = [(t, d, i, t.detach().index_select(d, i).clone())
                     for t, d, i in self._omitted_state(keep_heads, keep_channels)]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t, d, i, values in saved:
                t.index_copy_(d, i, values)
        return loss_sum

    def state(self) -> dict[str, list[torch.Tensor | None]]:
        """{name: [weight, exp_avg, exp_avg_sq]} (moments None before the parameter's first step)."""
        def copy(state, key):
            return state[key].clone() if key in state else None

        return {name: [p.detach().clone()] + [copy(self.optimizer.state.get(p, {}), k) for k in MOMENTS]
                for name, p in self.model.named_parameters()}


class HandSAT:
    """SAT's per-step decisions for one model, by hand (see the module docstring).

    LORS: S1 = floor(stage1_fraction T) steps at rate r, then ``rungs`` equal rungs down to 0,
    rung = ceil((t - S1 + 1) rungs / (T - S1)) - 1, rate = r (rungs - 1 - rung) / (rungs - 1).
    Importance (``activation``): per head the mean over tokens of the L2 norm of its o_proj input, per
    MLP channel the mean over tokens of |down_proj input|, averaged over the step's forwards; the score is
    the first statistic as is, then decay * score + (1 - decay) * statistic; an omitted unit's score is
    multiplied by decay. Nothing is recorded or decayed at rate 0: rates never rise, so those scores would
    never be read (a rate-0 step is a plain dense step). Selection: per layer the ceil((1 - rate) n)
    highest scores (units never computed first), ties to the lower index, within each of ``shards`` equal
    blocks (tensor parallel "balanced"); ``kv_group`` granularity ranks whole GQA groups by their heads'
    summed scores.
    """

    def __init__(self, conf: LlamaConfig, sat, total_steps: int, shards: int = 1, dtype: torch.dtype = torch.float64):
        """``dtype``: of the statistics and scores (the reference model's, so a float32 twin rounds as float32)."""
        implemented = ("ladder", "activation", "topk", True, True, 1)
        given = (sat.schedule, sat.metric, sat.selection, sat.heads, sat.channels, sat.reselect_every)
        if given != implemented:
            raise ValueError(f"HandSAT implements (schedule, metric, selection, heads, channels, reselect_every) = "
                             f"{implemented}, got {given}")
        self.conf, self.sat, self.total, self.shards = conf, sat, total_steps, shards
        L = conf.num_hidden_layers
        self.n = {"heads": conf.num_attention_heads, "channels": conf.intermediate_size}
        self.score = {k: torch.zeros(L, n, dtype=dtype) for k, n in self.n.items()}
        self.seen = {k: torch.zeros(L, n, dtype=torch.bool) for k, n in self.n.items()}
        self._sum = {k: torch.zeros(L, n, dtype=dtype) for k, n in self.n.items()}
        self._count = {k: torch.zeros(L, n, dtype=dtype) for k, n in self.n.items()}

    def rate(self, step: int) -> float:
        s = self.sat
        start = math.floor(s.stage1_fraction * self.total)
        if step < start:
            return s.omission_rate
        rung = math.ceil((step - start + 1) * s.rungs / (self.total - start)) - 1
        return s.omission_rate * (s.rungs - 1 - rung) / (s.rungs - 1)

    def _top(self, scores: list[float], k_per_block: int) -> list[int]:
        block = len(scores) // self.shards
        kept = []
        for b in range(self.shards):
            units = range(b * block, (b + 1) * block)
            kept += sorted(units, key=lambda u: (-scores[u], u))[:k_per_block]
        return sorted(kept)

    def select(self, rate: float) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """(keep_heads, keep_channels) of the step; a kind with every unit kept is left out (dense)."""
        keep = ({}, {})
        groups = self.conf.num_attention_heads // self.conf.num_key_value_heads
        for kind, out in zip(("heads", "channels"), keep):
            n = self.n[kind]
            ranking = torch.where(self.seen[kind], self.score[kind], math.inf).tolist()
            for layer, scores in enumerate(ranking):
                if kind == "heads" and self.sat.granularity == "kv_group":
                    group_scores = [sum(scores[g * groups:(g + 1) * groups]) for g in range(n // groups)]
                    k = max(1, math.ceil(round((1 - rate) * len(group_scores) / self.shards, 9)))
                    kept = [g * groups + i for g in self._top(group_scores, k) for i in range(groups)]
                else:
                    k = max(1, math.ceil(round((1 - rate) * n / self.shards, 9)))
                    kept = self._top(scores, k)
                if len(kept) < n:
                    out[layer] = kept
        return keep

    def recording(self, model: LlamaForCausalLM, keep_heads: dict, keep_channels: dict) -> list:
        """Forward pre-hooks that record the step's statistics of the computed units (call before the masks)."""
        hd = self.conf.hidden_size // self.conf.num_attention_heads
        hooks = []
        for index, layer in enumerate(model.model.layers):
            for kind, module, kept in (("heads", layer.self_attn.o_proj, keep_heads.get(index)),
                                       ("channels", layer.mlp.down_proj, keep_channels.get(index))):
                units = list(range(self.n[kind])) if kept is None else list(kept)

                def record(m, args, kind=kind, index=index, units=units):
                    x = args[0].detach()
                    if kind == "heads":
                        stat = x.unflatten(-1, (-1, hd)).norm(dim=-1).flatten(0, -2).mean(0)
                    else:
                        stat = x.abs().flatten(0, -2).mean(0)
                    self._sum[kind][index, units] += stat[units]
                    self._count[kind][index, units] += 1

                hooks.append(module.register_forward_pre_hook(record))
        return hooks

    def update(self) -> None:
        d = self.sat.ema_decay
        for kind in self.n:
            observed = self._count[kind] > 0
            mean = self._sum[kind] / self._count[kind].clamp(min=1)
            blended = torch.where(self.seen[kind], d * self.score[kind] + (1 - d) * mean, mean)
            self.score[kind] = torch.where(observed, blended, d * self.score[kind])
            self.seen[kind] |= observed
            self._sum[kind].zero_()
            self._count[kind].zero_()


def sat_reference(conf: LlamaConfig, seed: int, sat, optim, steps: list[list[torch.Tensor]], lrs: list[float],
                  dtype: torch.dtype = torch.float64, shards: int = 1, selections: list | None = None,
                  checkpoints: tuple[int, ...] = ()):
    """SAT + LORS driven by hand over ``steps`` (each a list of global micro-batches) at ``lrs``, with
    ``sat.optimizer_policy``. ``selections``: impose these (keep_heads, keep_channels) instead of the hand-made
    ones (to run a float32 twin on exactly the float64 run's units). Returns (losses, rates, selections,
    {step: Reference.state()}, {step: importance scores}) with the states and scores after the steps
    counted by ``checkpoints``."""
    ref = Reference(seeded_model(conf, seed, dtype), optim, dtype)
    hand = HandSAT(conf, sat, len(steps), shards, dtype)
    losses, rates, chosen, states, scores = [], [], [], {}, {}
    for t, (micro_batches, lr) in enumerate(zip(steps, lrs)):
        rate = hand.rate(t)
        keep = hand.select(rate) if selections is None else selections[t]
        hooks = hand.recording(ref.model, *keep) if rate > 0 else []
        losses.append(ref.step(micro_batches, lr, *keep, freeze=sat.optimizer_policy == "freeze"))
        for hook in hooks:
            hook.remove()
        if rate > 0:
            hand.update()
        rates.append(rate)
        chosen.append(keep)
        if t + 1 in checkpoints:
            states[t + 1] = ref.state()
            scores[t + 1] = {kind: score.clone() for kind, score in hand.score.items()}
    return losses, rates, chosen, states, scores


def deviation(got: dict[str, list], want: dict[str, list], lr: float) -> dict[str, float]:
    """How far ``got`` is from ``want`` ({name: [weight, *moments]}), over the parameters of ``want``:
    ``weight``, the largest weight difference in units of ``lr``; ``weight_rms``, the root mean square of
    all weight differences in units of ``lr`` (float error concentrates on the few coordinates where Adam
    amplifies it, a wrong step moves every weight); ``moment``, the largest moment difference relative to
    that moment's largest entry (0 where either side has no moments)."""
    largest = squares = count = moments = 0.0
    for name, (weight, *state) in want.items():
        mine = got[name]
        diff = (mine[0].double() - weight.double()) / lr
        largest = max(largest, diff.abs().max().item())
        squares, count = squares + diff.square().sum().item(), count + diff.numel()
        for have, ref in zip(mine[1:], state):
            if have is not None and ref is not None:
                scale = max(ref.double().abs().max().item(), 1e-30)
                moments = max(moments, (have.double() - ref.double()).abs().max().item() / scale)
    return {"weight": largest, "weight_rms": (squares / count) ** 0.5, "moment": moments}


def assert_within_float_error(err: dict[str, float], f32: dict[str, float]) -> None:
    """A multi-rank float32 run's weight deviation ``err`` from the float64 reference, against the float32
    twin's ``f32`` (both from :func:`deviation`): RMS within 2 e32, the largest error within 4 e32.

    The largest error is one element's: where Adam amplifies gradient rounding most (|g| near eps), the same
    element in the run and in the twin (measured), so it is the size of one rounding draw there, and one draw
    of the twin bounds another's only loosely: a tp=2 run's largest error was 2.2 times the twin's on an
    AVX-512 CPU, at the element where the twin's was largest, with the RMS at 1.6 times
    (docs/examples/float_tolerance_avx512.txt). A wrong step (a
    missed reduction, a frozen row that moved) is of order lr on whole rows: the RMS bounds here are 5e-5
    to 2e-3 lr (the ``adam`` and ``freeze`` references end 1.0 lr RMS apart, tests/test_reference_sat.py)."""
    assert err["weight_rms"] <= 2 * f32["weight_rms"], (err, f32)
    assert err["weight"] <= 4 * f32["weight"], (err, f32)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread (restored after): the tiny models' GEMMs gain nothing from a second thread, and
    on a shared machine two OpenMP threads per process wait on each other (measured 8x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def checkpoint_state(path) -> dict[str, list[torch.Tensor]]:
    """{name: [weight, exp_avg, exp_avg_sq]} from a single-process DeepSpeed checkpoint file
    (``mp_rank_00_model_states.pt``): the module's weights and, under ZeRO-0, torch AdamW's state, whose
    parameter indices run over the trainer's groups (matrices, then 1-D parameters, each in module order;
    a tied head is the embedding's tensor and one parameter); moments None under ZeRO-1/2."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    module, seen = {}, set()
    for name, value in saved["module"].items():
        key = (value.data_ptr(), tuple(value.shape))  # ZeRO-1/2 weights are views of one flat buffer
        if key not in seen:
            seen.add(key)
            module[name] = value
    order = [n for n, v in module.items() if v.dim() >= 2] + [n for n, v in module.items() if v.dim() < 2]
    state = (saved["optimizer"] or {}).get("state", {})  # ZeRO-1/2 keep it in their own partition files
    return {name: [module[name].double()] + [state.get(i, {}).get(k) for k in MOMENTS]
            for i, name in enumerate(order)}


def check_sat_run(cfg_dict: dict, rows: list[dict], export_dir, shards: int = 1) -> dict[str, float]:
    """A finished trainer run of ``cfg_dict`` (SAT with LORS, no V-cycle, one data-parallel group: every rank
    reads the whole global batch) against :func:`sat_reference` in float64: the rates, LRs and losses of
    ``rows`` (metrics.jsonl, a row per step) and the weights in ``export_dir``, each within 2x the float32
    twin's deviation (tests/test_reference_sat.py argues the bound; losses also get 4 float32 ulps), the
    largest weight error within 4x (:func:`assert_within_float_error`).
    ``shards``: the tensor-parallel ranks a ``balanced`` selection spreads over. Returns the deviations."""
    from ds_accel.config import from_dict
    from ds_accel.data import BlockSampler, prepare
    from ds_accel.models import model_config

    cfg = from_dict(cfg_dict)
    o, total = cfg.optim, cfg.run.total_steps
    with one_thread():
        corpus = prepare(cfg.data)
        conf = model_config(cfg.model, corpus.vocab_size)
        sampler = BlockSampler(len(corpus.train), o.micro_batch_size, o.grad_accum, 1, cfg.run.seed)
        steps = [[corpus.train[sampler.indices(t, a, 0)] for a in range(o.grad_accum)] for t in range(total)]
        lrs = [o.lr * warmup_cosine(t, total, o.warmup_steps, o.min_lr_ratio) for t in range(total)]
        losses, rates, keeps, states, _ = sat_reference(conf, cfg.run.seed, cfg.sat, o, steps, lrs, torch.float64,
                                                        shards, checkpoints=(total,))
        f32_losses, _, _, f32_states, _ = sat_reference(conf, cfg.run.seed, cfg.sat, o, steps, lrs, torch.float32,
                                                        shards, selections=keeps, checkpoints=(total,))
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, total + 1)), "log_every must be 1"
    assert [r["omission_rate"] for r in rows] == rates and max(rates) > 0 and rates[-1] == 0
    assert [r["lr"] for r in rows] == pytest.approx(lrs, rel=1e-12)
    loss_f32 = max(abs(a - b) / b for a, b in zip(f32_losses, losses))
    loss_err = max(abs(r["loss"] - b) / b for r, b in zip(rows, losses))
    assert loss_err <= 2 * loss_f32 + 4 * ULP32, (loss_err, loss_f32)
    exported = LlamaForCausalLM.from_pretrained(str(export_dir), torch_dtype=torch.float32)
    got = {name: [p.detach()] for name, p in exported.named_parameters()}
    f32 = deviation(f32_states[total], states[total], o.lr)
    err = deviation(got, states[total], o.lr)
    assert f32["weight"] < 0.3, "the float32 reference itself is far off"
    assert_within_float_error(err, f32)
    return {"loss": loss_err, "loss_f32": loss_f32, **{k: err[k] for k in ("weight", "weight_rms")},
            **{f"{k}_f32": f32[k] for k in ("weight", "weight_rms")}}
