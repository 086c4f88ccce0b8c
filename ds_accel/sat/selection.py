"""Selection of the units SAT keeps in a step (Ma et al., 2024).

At omission rate r, each layer keeps its top ceil((1 - r) * n) units by importance (at least one). Ties
go to the lower index (stable sort), so selection is a deterministic function of the scores: ranks that
hold the same all-reduced scores select the same units.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ds_accel.sat.importance import ImportanceTracker

GRANULARITIES = ("head", "kv_group")


def _check_rate(omission_rate: float) -> None:
    if not 0.0 <= omission_rate < 1.0:
        raise ValueError(f"omission_rate must be in [0, 1), got {omission_rate}")


def num_kept(n: int, omission_rate: float) -> int:
    """ceil((1 - r) * n), at least 1; the product is rounded to 9 decimals first so that float error
    (e.g. (1 - 0.7) * 10 = 3.0000000000000004) does not keep one unit too many."""
    _check_rate(omission_rate)
    return max(1, math.ceil(round((1.0 - omission_rate) * n, 9)))


def select_topk(scores: Tensor, omission_rate: float) -> Tensor:
    """Indices of the num_kept(n, r) highest ``scores``, ties to the lower index, sorted ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:num_kept(scores.numel(), omission_rate)].sort().values


def select_topk_balanced(scores: Tensor, omission_rate: float, num_shards: int) -> Tensor:
    """:func:`select_topk` within each of ``num_shards`` contiguous equal shards of ``scores``.

    Every shard keeps the same number of units, so a tensor-parallel rank holding one shard computes
    the same amount of work as the others (the global top-k could leave a rank idle).
    """
    if num_shards < 1 or scores.numel() % num_shards:
        raise ValueError(f"num_shards must be a positive divisor of {scores.numel()}, got {num_shards}")
    shard = scores.numel() // num_shards
    return torch.cat([select_topk(part, omission_rate) + i * shard
                      for i, part in enumerate(scores.split(shard))])


def _topk(scores: Tensor, omission_rate: float, num_shards: int) -> Tensor:
    if num_shards == 1:
        return select_topk(scores, omission_rate)
    return select_topk_balanced(scores, omission_rate, num_shards)


def select_heads(tracker: ImportanceTracker, layer: int, omission_rate: float,
                 granularity: str = "head", num_shards: int = 1) -> Tensor:
    """Kept query heads of ``layer``.

    granularity "head": top query heads; their KV heads (the union of their groups) are computed too.
    granularity "kv_group": top GQA groups by summed query-head score, keeping all query heads of each
    kept group: only this omits K/V projections in proportion to the rate.
    """
    if granularity == "head":
        return _topk(tracker.head_scores(layer), omission_rate, num_shards)
    if granularity != "kv_group":
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    group_scores = tracker.kv_group_scores(layer)
    group_size = tracker.head_scores(layer).numel() // group_scores.numel()
    groups = _topk(group_scores, omission_rate, num_shards)
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).flatten()


def select(tracker: ImportanceTracker, omission_rate: float, granularity: str = "head", num_shards: int = 1,
           head_omission_rate: float | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """(keep_heads, keep_channels) for :func:`ds_accel.sat.omit` over all of the tracker's layers.

    ``omission_rate`` applies to MLP channels, and to heads unless ``head_omission_rate`` is given.
    ``num_shards`` > 1 balances the selection over tensor-parallel shards. A layer that would keep all
    its units is left out of the dicts (dense), so a rate-0 step returns ({}, {}).
    """
    head_rate = omission_rate if head_omission_rate is None else head_omission_rate
    keep_heads, keep_channels = {}, {}
    for layer in tracker.layers:
        heads = select_heads(tracker, layer, head_rate, granularity, num_shards)
        if heads.numel() < tracker.head_scores(layer).numel():
            keep_heads[layer] = heads
        channels = _topk(tracker.channel_scores(layer), omission_rate, num_shards)
        if channels.numel() < tracker.channel_scores(layer).numel():
            keep_channels[layer] = channels
    return keep_heads, keep_channels


__all__ = ["GRANULARITIES", "num_kept", "select", "select_heads", "select_topk", "select_topk_balanced"]
