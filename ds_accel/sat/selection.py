"""Selection of the units SAT keeps in a step (Ma et al., 2024).

At omission rate r each layer keeps k = ceil((1 - r) * n) of its n units (at least one), chosen from
their importance by ``sat.selection``:

* ``topk``: the k highest scores, ties to the lower index (stable sort);
* ``sample``: k units drawn without replacement, each draw with probability proportional to the
  importance of the units not drawn yet (successive sampling). Drawn as Efraimidis and Spirakis'
  weighted reservoir: with u_i uniform in (0, 1), keep the k largest keys log(u_i) / s_i. Units never
  computed (score +inf) get key 0, above every other key, so they still come first, ties to the lower
  index; units scoring 0 are drawn last.

Both are a deterministic function of the scores (and, for ``sample``, of the seed and the step, whose
uniform draws come from a CPU generator seeded by them): ranks that hold the same all-reduced scores
select the same units. All layers are selected together, one batched sort per kind of unit, with no
host synchronisation (the kept counts follow from the shapes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ds_accel.sat.importance import CHANNELS, HEADS, ImportanceTracker

GRANULARITIES = ("head", "kv_group")
SELECTIONS = ("topk", "sample")


def _check_rate(omission_rate: float) -> None:
    if not 0.0 <= omission_rate < 1.0:
        raise ValueError(f"omission_rate must be in [0, 1), got {omission_rate}")


def num_kept(n: int, omission_rate: float) -> int:
    """ceil((1 - r) * n), at least 1; the product is rounded to 9 decimals first so that float error
    (e.g. (1 - 0.7) * 10 = 3.0000000000000004) does not keep one unit too many."""
    _check_rate(omission_rate)
    return max(1, math.ceil(round((1.0 - omission_rate) * n, 9)))


def top_rows(scores: Tensor, omission_rate: float, num_shards: int = 1) -> Tensor:
    """Per row of ``scores`` (rows, n): its num_kept(n / num_shards, r) highest entries within each of
    ``num_shards`` contiguous equal shards, ties to the lower index; indices into the row, ascending.

    ``num_shards`` > 1 keeps the same number of units in every shard, so a tensor-parallel rank holding
    one shard computes as much as the others (a global top-k could leave a rank idle).
    """
    rows, n = scores.shape
    if num_shards < 1 or n % num_shards:
        raise ValueError(f"num_shards must be a positive divisor of {n}, got {num_shards}")
    shard = n // num_shards
    k = num_kept(shard, omission_rate)
    order = torch.sort(scores.view(rows, num_shards, shard), dim=-1, descending=True, stable=True).indices
    offsets = torch.arange(0, n, shard, device=scores.device)[:, None]
    return (order[..., :k] + offsets).flatten(1).sort(dim=1).values


def select_topk(scores: Tensor, omission_rate: float) -> Tensor:
    """Indices of the num_kept(n, r) highest ``scores``, ties to the lower index, sorted ascending."""
    return top_rows(scores[None], omission_rate)[0]


def select_topk_balanced(scores: Tensor, omission_rate: float, num_shards: int) -> Tensor:
    """:func:`select_topk` within each of ``num_shards`` contiguous equal shards of ``scores``."""
    return top_rows(scores[None], omission_rate, num_shards)[0]


def sample_keys(scores: Tensor, uniform: Tensor) -> Tensor:
    """Keys log(u) / s whose top-k is a draw of k units without replacement, probability proportional
    to the scores ``s`` >= 0 (Efraimidis and Spirakis); ``uniform``: u in (0, 1), the shape of ``scores``."""
    return uniform.to(scores.device, torch.float64).log() / scores.to(torch.float64)


def sample_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step``'s draws: the same on every rank, and on a resumed run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _kept_rows(scores: Tensor, omission_rate: float, num_shards: int, selection: str,
               generator: torch.Generator | None) -> Tensor:
    if selection == "sample":
        uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
        scores = sample_keys(scores, uniform.clamp_(min=torch.finfo(torch.float64).tiny))
    elif selection != "topk":
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return top_rows(scores, omission_rate, num_shards)


def kept_heads(tracker: ImportanceTracker, omission_rate: float, granularity: str = "head",
               num_shards: int = 1, selection: str = "topk", generator: torch.Generator | None = None) -> Tensor:
    """Kept query heads of every tracked layer, (layers, kept) in ``tracker.layers`` order.

    granularity "head": chosen among the query heads; their KV heads (the union of their groups) are
    computed too. granularity "kv_group": whole GQA groups chosen by summed query-head score, keeping
    all query heads of each kept group: only this omits K/V projections in proportion to the rate.
    """
    scores = tracker.ranking(HEADS)
    if granularity == "head":
        return _kept_rows(scores, omission_rate, num_shards, selection, generator)
    if granularity != "kv_group":
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    group_size = scores.shape[1] // tracker.num_kv_heads
    groups = _kept_rows(scores.view(len(scores), tracker.num_kv_heads, group_size).sum(-1), omission_rate,
                        num_shards, selection, generator)
    return (groups[..., None] * group_size + torch.arange(group_size, device=groups.device)).flatten(1)


def select_heads(tracker: ImportanceTracker, layer: int, omission_rate: float,
                 granularity: str = "head", num_shards: int = 1) -> Tensor:
    """Kept query heads of one layer by top-k (see :func:`kept_heads`)."""
    return kept_heads(tracker, omission_rate, granularity, num_shards)[tracker.row[layer]]


def select(tracker: ImportanceTracker, omission_rate: float, granularity: str = "head", num_shards: int = 1,
           head_omission_rate: float | None = None, selection: str = "topk", seed: int = 0,
           step: int = 0) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """(keep_heads, keep_channels) for :func:`ds_accel.sat.omit` over all of the tracker's layers.

    ``omission_rate`` applies to MLP channels, and to heads unless ``head_omission_rate`` is given.
    ``num_shards`` > 1 balances the selection over tensor-parallel shards. ``selection`` "topk" or
    "sample" (then drawn by ``sample_generator(seed, step)``, heads first). A kind of unit of which all
    would be kept is left out of the dicts (dense), so a rate-0 step returns ({}, {}).
    """
    head_rate = omission_rate if head_omission_rate is None else head_omission_rate
    generator = sample_generator(seed, step) if selection == "sample" else None
    n_heads, n_channels = tracker.score[HEADS].shape[1], tracker.score[CHANNELS].shape[1]
    keep_heads, keep_channels = {}, {}
    if num_kept(n_heads, head_rate) < n_heads:
        heads = kept_heads(tracker, head_rate, granularity, num_shards, selection, generator)
        if heads.shape[1] < n_heads:
            keep_heads = dict(zip(tracker.layers, heads))
    if num_kept(n_channels, omission_rate) < n_channels:
        channels = _kept_rows(tracker.ranking(CHANNELS), omission_rate, num_shards, selection, generator)
        if channels.shape[1] < n_channels:
            keep_channels = dict(zip(tracker.layers, channels))
    return keep_heads, keep_channels


__all__ = ["GRANULARITIES", "SELECTIONS", "kept_heads", "num_kept", "sample_generator", "sample_keys", "select",
           "select_heads", "select_topk", "select_topk_balanced", "top_rows"]
