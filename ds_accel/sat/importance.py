"""Importance of attention heads and MLP channels for Sparsity-Accelerated Training (Ma et al., 2024).

SAT omits the least important units of each layer in a training step. A unit's importance is a
statistic gathered from the forward passes training already runs (no extra pass), smoothed over steps
with an exponential moving average (EMA). Every metric reads what the output projection (o_proj,
down_proj) of the unit sees: its input x (per token, the unit's features: head_dim of them for an
attention head, one for an MLP channel) and its columns W[:, unit] of that projection's weight. The
sliced forward of :mod:`ds_accel.sat.omit` and the dense forward pass the same, so a unit scores the same
whichever path computed it. ``sat.metric`` (the paper compares activation- and weight-based metrics):

* ``activation`` (the default): MLP channel c, mean over tokens of |a_c| with a = act(x W_gate^T) *
  (x W_up^T); attention head h, mean over tokens of ||o_h||_2, its attention output;
* ``weight``: the L2 (Frobenius) norm of the unit's output-projection columns, ||W[:, unit]||_F; the
  unit's q/k/v or gate/up rows are not part of it (the recorders see only the output projection);
* ``wanda`` (Wanda pruning's |W_ij| ||X_j||_2, summed over the unit's weights): sum over the unit's input
  features j of ||W[:, j]||_1 * rms_t(x_j), the RMS over tokens in place of Wanda's norm over tokens
  (the same ranking within a forward, and micro-batches of any size average alike);
* ``random``: uniform random scores, the control.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ds_accel.structure import decoder_layers

METRICS = ("activation", "weight", "wanda", "random")
HEADS, CHANNELS = "heads", "channels"


def _wide(x: Tensor) -> torch.dtype:
    """Reduction dtype: at least float32, so bf16/fp16 activations are reduced in float32."""
    return torch.promote_types(x.dtype, torch.float32)


def head_magnitude(o_input: Tensor, head_dim: int) -> Tensor:
    """Per-head statistic of one forward: mean over tokens of ||o_h||_2.

    ``o_input`` is the o_proj input, shape (..., heads * head_dim); heads are blocks of head_dim features.
    """
    norms = torch.linalg.vector_norm(o_input.unflatten(-1, (-1, head_dim)), dim=-1, dtype=_wide(o_input))
    return norms.flatten(0, -2).mean(0)


def channel_magnitude(a: Tensor) -> Tensor:
    """Per-channel statistic of one forward: mean over tokens of |a_c|.

    ``a`` is the down_proj input, shape (..., channels). ``abs`` then a mean over the token rows, not
    ``vector_norm(ord=1)`` over the leading dims: on the 2-core CPU that reduction took about 2x as long at
    the ``small`` preset's kept channels and 3x at a Llama-2-7B layer's
    (docs/benchmark/step/small_probe/recording_probe.txt), in every SAT step; it is two operations, as
    before (one launch more would cost a GPU step that waits on the host). ``abs`` is exact in any dtype;
    the mean is taken in float32.
    """
    return a.flatten(0, -2).abs().mean(0, dtype=_wide(a))


def weight_norm(weight: Tensor, unit_size: int) -> Tensor:
    """Per unit: ||W[:, unit]||_F over the unit's ``unit_size`` consecutive columns of ``weight`` (out, units * unit_size)."""
    columns = torch.linalg.vector_norm(weight, dim=0, dtype=_wide(weight))
    return columns.square().view(-1, unit_size).sum(1).sqrt()


def wanda(x: Tensor, weight: Tensor, unit_size: int) -> Tensor:
    """Per unit: sum over its input features j of ||W[:, j]||_1 * rms over tokens of x_j.

    ``x`` (..., units * unit_size) is the projection's input and ``weight`` (out, units * unit_size) its
    columns of the same units, in the same order.
    """
    tokens = x.numel() // x.shape[-1]
    rms = torch.linalg.vector_norm(x.flatten(0, -2), dim=0, dtype=_wide(x)) / tokens ** 0.5
    column_l1 = torch.linalg.vector_norm(weight, ord=1, dim=0, dtype=_wide(weight))
    return (column_l1 * rms).view(-1, unit_size).sum(1)


class ImportanceTracker:
    """EMA importance scores of every head and MLP channel of a set of decoder layers.

    Per step: the forward passes call :meth:`record_heads` / :meth:`record_channels` (micro-batches and
    gradient-checkpointing recomputations are averaged, so a recomputation does not bias the score);
    then :meth:`update` folds the step's mean statistic s into the score:

        score <- decay * score + (1 - decay) * s     for units computed in the step,
        score <- decay * score                       for omitted units (they decay and can come back),

    except that a unit's first statistic becomes its score as is (no bias toward the zero init). Units
    never computed yet rank above all others in selection (their score reads +inf there), so the first
    steps of SAT visit every unit before trusting the scores.

    Data parallelism: each rank records its own micro-batches. After :meth:`update` and before
    selection, the engine averages :meth:`scores` across ranks in place (all-reduce SUM then divide by
    the world size, or AVG). The EMA is linear and the "seen" masks agree on all ranks (selection is
    identical), so this equals the EMA of the rank-averaged statistic and every rank selects the same
    units. :meth:`flat` / :meth:`set_flat` offer the same as one buffer.

    metric="random" is the control: scores are uniform random numbers drawn from a generator seeded with
    ``seed`` at construction and at every :meth:`update`, identical on all ranks; records are ignored.

    Args: ``layers`` the decoder-layer indices tracked (global indices on a pipeline stage); the sizes
    of one layer (query heads, KV heads, MLP channels, head_dim); ``decay`` the EMA decay in [0, 1);
    ``metric`` one of :data:`METRICS` (see the module docstring); ``seed`` for "random"; ``device`` of
    the score tensors (put them where the activations and the all-reduce are).
    """

    def __init__(self, layers: Iterable[int], num_heads: int, num_kv_heads: int, num_channels: int,
                 head_dim: int, decay: float = 0.9, metric: str = "activation", seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.layers = sorted(layers)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.decay, self.metric = decay, metric
        self.generator = torch.Generator().manual_seed(seed)
        sizes = {HEADS: num_heads, CHANNELS: num_channels}

        def new(kind: str, dtype: torch.dtype) -> Tensor:
            return torch.zeros(len(self.layers), sizes[kind], dtype=dtype, device=device)

        self.score = {kind: new(kind, torch.float32) for kind in sizes}
        self.seen = {kind: new(kind, torch.bool) for kind in sizes}
        self._sum = {kind: new(kind, torch.float32) for kind in sizes}
        self._count = {kind: new(kind, torch.float32) for kind in sizes}
        if metric == "random":
            self._draw_random()

    @classmethod
    def for_model(cls, model_or_layers: Any, **kwargs: Any) -> ImportanceTracker:
        """Tracker sized from the decoder layers of a Llama model (see :func:`ds_accel.structure.decoder_layers`)."""
        layers = decoder_layers(model_or_layers)
        first = next(iter(layers.values()))
        config = first.self_attn.config
        kwargs.setdefault("device", first.mlp.down_proj.weight.device)
        return cls(layers, config.num_attention_heads, config.num_key_value_heads,
                   first.mlp.down_proj.in_features, first.self_attn.head_dim, **kwargs)

    @torch.no_grad()
    def record_heads(self, layer: int, o_input: Tensor, kept: Tensor | None = None,
                     weight: Tensor | None = None) -> None:
        """Record one forward's head statistic from the o_proj input; ``kept``: its heads (None: all);
        ``weight``: o_proj's columns of those heads (needed by the weight and wanda metrics)."""
        if self.metric != "random":
            self._accumulate(HEADS, layer, self._statistic(o_input, weight, self.head_dim), kept)

    @torch.no_grad()
    def record_channels(self, layer: int, a: Tensor, kept: Tensor | None = None,
                        weight: Tensor | None = None) -> None:
        """Record one forward's channel statistic from the down_proj input; ``kept``: its channels;
        ``weight``: down_proj's columns of those channels (needed by the weight and wanda metrics)."""
        if self.metric != "random":
            self._accumulate(CHANNELS, layer, self._statistic(a, weight, 1), kept)

    def _statistic(self, x: Tensor, weight: Tensor | None, unit_size: int) -> Tensor:
        """The metric's per-unit statistic of one forward (units of ``unit_size`` features of ``x``)."""
        x = x.detach()
        if self.metric == "activation":
            return channel_magnitude(x) if unit_size == 1 else head_magnitude(x, unit_size)
        if weight is None:
            raise ValueError(f"metric {self.metric!r} scores units by their output-projection weights; "
                             "the recorder must pass weight=")
        return weight_norm(weight, unit_size) if self.metric == "weight" else wanda(x, weight, unit_size)

    def _accumulate(self, kind: str, layer: int, stat: Tensor, kept: Tensor | None) -> None:
        total, count = self._sum[kind][self.row[layer]], self._count[kind][self.row[layer]]
        stat = stat.to(total.device, total.dtype)
        if kept is None:
            total += stat
            count += 1
        else:
            kept = kept.to(total.device)
            total.index_add_(0, kept, stat)
            count.index_add_(0, kept, torch.ones_like(stat))

    @torch.no_grad()
    def update(self) -> None:
        """End of step: fold the recorded statistics into the EMA scores and clear them."""
        if self.metric == "random":
            self._draw_random()
            return
        for kind, score in self.score.items():
            count, seen = self._count[kind], self.seen[kind]
            observed = count > 0
            mean = self._sum[kind] / count.clamp(min=1)
            decayed = self.decay * score
            blended = torch.where(seen, decayed + (1 - self.decay) * mean, mean)
            score.copy_(torch.where(observed, blended, decayed))
            seen |= observed
            self._sum[kind].zero_()
            count.zero_()

    def _draw_random(self) -> None:
        for kind, score in self.score.items():
            score.copy_(torch.rand(score.shape, generator=self.generator))
            self.seen[kind].fill_(True)

    def ranking(self, kind: str) -> Tensor:
        """Scores for selection of every tracked layer, (layers, units) in :attr:`layers` order, with +inf
        for units never computed; ``kind`` "heads" (query heads) or "channels"."""
        return torch.where(self.seen[kind], self.score[kind], torch.inf)

    def _ranking(self, kind: str, layer: int) -> Tensor:
        return self.ranking(kind)[self.row[layer]]

    def head_scores(self, layer: int) -> Tensor:
        """Scores of the query heads of ``layer`` for selection (+inf for heads never computed)."""
        return self._ranking(HEADS, layer)

    def kv_group_scores(self, layer: int) -> Tensor:
        """GQA: score of each KV head = sum of the scores of the query heads that share it."""
        return self.head_scores(layer).view(self.num_kv_heads, -1).sum(1)

    def channel_scores(self, layer: int) -> Tensor:
        """Scores of the MLP channels of ``layer`` for selection (+inf for channels never computed)."""
        return self._ranking(CHANNELS, layer)

    def scores(self) -> list[Tensor]:
        """The raw score tensors, (layers, heads) and (layers, channels): all-reduce (average) in place."""
        return [self.score[HEADS], self.score[CHANNELS]]

    def flat(self) -> Tensor:
        """All scores as one float32 buffer (a copy), for a single all-reduce."""
        return torch.cat([s.flatten() for s in self.scores()])

    def set_flat(self, flat: Tensor) -> None:
        """Inverse of :meth:`flat`: write the (all-reduced) buffer back into the scores."""
        offset = 0
        for s in self.scores():
            s.copy_(flat[offset:offset + s.numel()].view_as(s))
            offset += s.numel()

    def state_dict(self) -> dict[str, Any]:
        """Scores, seen masks and generator state, for checkpoint/resume (call after :meth:`update`)."""
        return {"layers": list(self.layers), "metric": self.metric,
                "score": {k: v.clone() for k, v in self.score.items()},
                "seen": {k: v.clone() for k, v in self.seen.items()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the layers and metric must match this tracker's."""
        if state["layers"] != self.layers or state["metric"] != self.metric:
            raise ValueError(f"state is for layers {state['layers']} / metric {state['metric']!r}, "
                             f"this tracker has {self.layers} / {self.metric!r}")
        for kind in self.score:
            self.score[kind].copy_(state["score"][kind])
            self.seen[kind].copy_(state["seen"][kind])
        self.generator.set_state(state["generator"])


__all__ = ["ImportanceTracker", "METRICS", "channel_magnitude", "head_magnitude", "wanda", "weight_norm"]
