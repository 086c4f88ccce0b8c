"""The SAT paper's importance metrics (activation, weight, wanda, random) and selections (topk, sample),
each against a hand-computed example or an independent formula."""
import math

import pytest
import torch

from ds_accel.config import ConfigError, from_dict
from ds_accel.sat import ImportanceTracker, omit, select
from ds_accel.sat.importance import channel_magnitude, wanda, weight_norm
from ds_accel.sat.selection import sample_keys, top_rows
from test_sat import KEEP_CHANNELS, KEEP_HEADS, batch, rows, tiny_model

# o_proj of 2 heads of head_dim 2 (2 output features) and down_proj of 3 channels
W_O = torch.tensor([[3.0, 4.0, 1.0, 0.0],
                    [0.0, 0.0, 2.0, 2.0]])
W_DOWN = torch.tensor([[1.0, 0.0, -2.0],
                       [-2.0, 0.0, 0.0]])
O_INPUT = torch.tensor([[[1.0, -1.0, 2.0, 0.0],
                         [1.0, 1.0, 0.0, 4.0]]])  # (batch 1, 2 tokens, 2 heads x head_dim 2)
A = torch.tensor([[[1.0, -2.0, 0.0],
                   [1.0, 2.0, 3.0]]])  # (batch 1, 2 tokens, 3 channels)


def recorded(metric: str, heads_kept=None, channels_kept=None) -> ImportanceTracker:
    """A one-layer tracker (2 heads, 1 KV head, 3 channels) after one recorded forward and update."""
    tracker = ImportanceTracker([0], 2, 1, 3, 2, decay=0.5, metric=metric)
    w_o = W_O if heads_kept is None else W_O.unflatten(1, (2, 2))[:, heads_kept].flatten(1)
    o_input = O_INPUT if heads_kept is None else O_INPUT.unflatten(-1, (2, 2))[..., heads_kept, :].flatten(-2)
    tracker.record_heads(0, o_input, None if heads_kept is None else torch.tensor(heads_kept), weight=w_o)
    w_down = W_DOWN if channels_kept is None else W_DOWN[:, channels_kept]
    a = A if channels_kept is None else A[..., channels_kept]
    tracker.record_channels(0, a, None if channels_kept is None else torch.tensor(channels_kept), weight=w_down)
    tracker.update()
    return tracker


def test_weight_metric_is_the_l2_norm_of_each_units_output_projection_columns():
    # head 0: columns 0-1 hold 3, 4, 0, 0 -> 5; head 1: columns 2-3 hold 1, 0, 2, 2 -> 3
    # channels: (1, -2) -> sqrt(5); (0, 0) -> 0; (-2, 0) -> 2
    tracker = recorded("weight")
    assert torch.allclose(tracker.head_scores(0), torch.tensor([5.0, 3.0]))
    assert torch.allclose(tracker.channel_scores(0), torch.tensor([math.sqrt(5), 0.0, 2.0]))
    # a sliced forward records only its kept units; the others keep ranking first (never computed)
    tracker = recorded("weight", heads_kept=[1], channels_kept=[0, 2])
    assert torch.allclose(tracker.head_scores(0), torch.tensor([math.inf, 3.0]))
    assert torch.allclose(tracker.channel_scores(0), torch.tensor([math.sqrt(5), math.inf, 2.0]))


def test_wanda_metric_sums_abs_weight_times_input_rms_over_each_units_features():
    # feature RMS over the 2 tokens: o_input (1, 1, sqrt(2), sqrt(8)); a (1, 2, sqrt(4.5))
    # column L1 of W_O: (3, 4, 3, 2); of W_DOWN: (3, 0, 2)
    # head 0: 3*1 + 4*1 = 7; head 1: 3*sqrt(2) + 2*sqrt(8) = 7 sqrt(2); channels: 3*1, 0*2, 2*sqrt(4.5)
    tracker = recorded("wanda")
    assert torch.allclose(tracker.head_scores(0), torch.tensor([7.0, 7 * math.sqrt(2)]))
    assert torch.allclose(tracker.channel_scores(0), torch.tensor([3.0, 0.0, 2 * math.sqrt(4.5)]))


def test_wanda_equals_the_wanda_score_matrix_summed_per_unit():
    """Independent reference: Wanda's score matrix S_ij = |W_ij| ||X_j||_2 (norm over all tokens), summed
    over each unit's columns, divided by sqrt(tokens); float64, random shapes with batch dims."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5 * 4, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5 * 4, generator=g, dtype=torch.float64)
    scores = w.abs() * x.reshape(-1, 20).norm(dim=0)[None, :]
    reference = scores.sum(0).view(5, 4).sum(1) / math.sqrt(21)
    assert torch.allclose(wanda(x, w, 4), reference, rtol=1e-12, atol=0)
    assert torch.allclose(weight_norm(w, 4), w.view(6, 5, 4).permute(1, 0, 2).reshape(5, -1).norm(dim=1),
                          rtol=1e-12, atol=0)


def test_activation_metric_is_the_mean_activation_magnitude():
    # head 0: token norms sqrt(2), sqrt(2); head 1: 2, 4; channels: mean of (1, 1), (2, 2), (0, 3)
    tracker = recorded("activation")
    assert torch.allclose(tracker.head_scores(0), torch.tensor([math.sqrt(2), (2 + 4) / 2]))
    assert torch.allclose(tracker.channel_scores(0), torch.tensor([1.0, 2.0, 1.5]))


def test_channel_statistic_of_bf16_activations_is_reduced_in_float32():
    # the mean over 3 x 700 tokens of |a_c|; a bf16 result would be off by up to 2**-9 relative
    a = torch.randn(3, 700, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    stat = channel_magnitude(a)
    expected = a.double().abs().reshape(-1, 5).mean(0)
    assert stat.dtype == torch.float32
    assert torch.allclose(stat.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("metric", ["weight", "wanda"])
def test_weight_metrics_need_the_weight(metric):
    tracker = ImportanceTracker([0], 2, 1, 3, 2, metric=metric)
    with pytest.raises(ValueError, match="weight="):
        tracker.record_channels(0, A)


def test_omit_passes_each_units_output_projection_columns_to_the_weight_metric():
    """Through the real forwards (sliced on layer 0, dense on layer 1): the weight metric's scores equal the
    norms of the model's own o_proj / down_proj columns for every computed unit."""
    model = tiny_model()
    layers = model.model.layers
    tracker = ImportanceTracker.for_model(model, metric="weight")
    with omit(model, KEEP_HEADS, KEEP_CHANNELS, tracker):
        model(**batch()).loss.backward()
    tracker.update()
    for index, layer in enumerate(layers):
        o_w, down_w = layer.self_attn.o_proj.weight.detach(), layer.mlp.down_proj.weight.detach()
        heads = KEEP_HEADS.get(index, torch.arange(8))
        channels = KEEP_CHANNELS.get(index, torch.arange(down_w.shape[1]))
        expected_heads = o_w[:, rows(heads)].view(o_w.shape[0], len(heads), -1).permute(1, 0, 2).flatten(1).norm(dim=1)
        assert torch.allclose(tracker.head_scores(index)[heads], expected_heads.float(), rtol=1e-6)
        assert torch.allclose(tracker.channel_scores(index)[channels], down_w[:, channels].norm(dim=0).float(),
                              rtol=1e-6)
        omitted_heads = torch.ones(8, dtype=torch.bool)
        omitted_heads[heads] = False
        assert torch.isinf(tracker.head_scores(index)[omitted_heads]).all()


def test_sample_keys_by_hand():
    """keys log(u)/s: unseen (+inf) -> -0, the top; score 0 -> -inf, the bottom."""
    scores = torch.tensor([math.inf, 1.0, 4.0, 0.0, 2.0])
    u = torch.tensor([0.5, 0.5, 0.5, 0.9, 0.36], dtype=torch.float64)
    keys = sample_keys(scores, u)
    # -0, ln 0.5 = -0.693, ln(0.5)/4 = -0.173, -inf, ln(0.36)/2 = ln 0.6 = -0.511
    expected = torch.tensor([0.0, math.log(0.5), math.log(0.5) / 4, -math.inf, math.log(0.6)], dtype=torch.float64)
    assert torch.allclose(keys, expected)
    assert top_rows(keys[None], 0.4)[0].tolist() == [0, 2, 4]


def test_sample_draws_without_replacement_proportionally_to_importance():
    """Scores (1, 2, 3), keep 2 of 3. p = (1/6, 1/3, 1/2); a unit is left out when the other two are drawn
    first, in either order: P(drop 0) = p1 p2/(1-p1) + p2 p1/(1-p2) = 1/4 + 1/3, so P(keep 0) = 5/12;
    P(keep 1) = 1 - (1/10 + 1/6) = 11/15; P(keep 2) = 1 - (1/15 + 1/12) = 17/20. 200,000 draws: the
    standard error is below 0.0012, the tolerance 0.005 (over 4 standard errors)."""
    n = 200_000
    u = torch.rand(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kept = top_rows(sample_keys(torch.tensor([1.0, 2.0, 3.0]).expand(n, 3), u), 1 / 3)
    frequency = torch.zeros(3).index_add_(0, kept.flatten(), torch.ones(kept.numel())) / n
    assert torch.allclose(frequency, torch.tensor([5 / 12, 11 / 15, 17 / 20]), atol=0.005)
    # the first draw alone (keep 1 of 3) is proportional to the scores
    first = top_rows(sample_keys(torch.tensor([1.0, 2.0, 3.0]).expand(n, 3), u), 2 / 3)
    assert torch.allclose(torch.bincount(first.flatten(), minlength=3) / n, torch.tensor([1 / 6, 1 / 3, 1 / 2]),
                          atol=0.005)


def tracker_with_scores(heads: list[list[float]], channels: list[list[float]], kv_heads: int = 2) -> ImportanceTracker:
    tracker = ImportanceTracker(range(len(heads)), len(heads[0]), kv_heads, len(channels[0]), 4)
    tracker.score["heads"].copy_(torch.tensor(heads))
    tracker.score["channels"].copy_(torch.tensor(channels))
    tracker.seen["heads"].fill_(True)
    tracker.seen["channels"].fill_(True)
    return tracker


def test_sample_selection_is_deterministic_per_seed_and_step_and_varies_between_steps():
    g = torch.Generator().manual_seed(1)
    tracker = tracker_with_scores(torch.rand(3, 8, generator=g).tolist(), torch.rand(3, 16, generator=g).tolist())

    def draw(step, seed=0):
        heads, channels = select(tracker, 0.5, selection="sample", seed=seed, step=step)
        return [h.tolist() for h in heads.values()] + [c.tolist() for c in channels.values()]

    assert draw(3) == draw(3)
    assert len({str(draw(step)) for step in range(6)}) > 1
    assert draw(3, seed=1) != draw(3, seed=0) or draw(4, seed=1) != draw(4, seed=0)
    heads, channels = select(tracker, 0.5, selection="sample", seed=0, step=3)
    assert all(len(h) == 4 for h in heads.values()) and all(len(c) == 8 for c in channels.values())
    assert select(tracker, 0.0, selection="sample") == ({}, {})


def test_sample_selection_keeps_unseen_units_first_and_zero_scores_last():
    tracker = tracker_with_scores([[0.0, 5.0, 0.0, 1.0]], [[0.0, 1.0, 0.0, 2.0, 0.0, 3.0]])
    tracker.seen["heads"][0, 2] = False  # never computed: +inf
    for step in range(20):
        heads, channels = select(tracker, 0.5, selection="sample", step=step)
        assert heads[0].tolist() == [1, 2] or heads[0].tolist() == [2, 3]
        assert 2 in heads[0].tolist()
        assert channels[0].tolist() == [1, 3, 5]  # the only non-zero scores


def test_sample_selection_with_kv_groups_and_tensor_parallel_shards():
    tracker = tracker_with_scores([[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]], [[1.0] * 8], kv_heads=4)
    for step in range(10):
        heads, channels = select(tracker, 0.5, "kv_group", num_shards=2, selection="sample", step=step)
        groups = heads[0].view(-1, 2)
        assert len(groups) == 2 and (groups[:, 1] == groups[:, 0] + 1).all() and (groups[:, 0] % 2 == 0).all()
        assert (groups[:, 0] < 4).sum() == 1  # one group in each TP shard of 2 groups
        assert (channels[0] < 4).sum() == 2 and len(channels[0]) == 4


def test_config_accepts_the_variants_and_names_the_field_on_a_mistake():
    cfg = from_dict({"sat": {"metric": "wanda", "selection": "sample"}, "deepspeed": {"config": "ds_configs/zero0.json"}})
    assert (cfg.sat.metric, cfg.sat.selection) == ("wanda", "sample")
    with pytest.raises(ConfigError, match="sat.metric: 'magnitude' is not one of activation, weight, wanda"):
        from_dict({"sat": {"metric": "magnitude"}})
    with pytest.raises(ConfigError, match="sat.selection: 'top' is not one of topk, sample"):
        from_dict({"sat": {"selection": "top"}})


@pytest.mark.parametrize("selection", ["topk", "sample"])
def test_the_trainers_controller_selects_by_sat_selection(selection):
    """The controller the trainer, the callback and the Megatron backend use passes ``sat.selection``, the
    run seed and the step to the selection (the first benchmark's ``sat-sample`` runs were top-k because
    it did not): its kept units are the selection's own draw, which differs from top-k for ``sample``."""
    from ds_accel.engine.sat import SATController

    cfg = from_dict({"sat": {"enabled": True, "selection": selection, "stage1_fraction": 1.0}}).sat
    sat = SATController(cfg, tiny_model(), total_steps=10, seed=7)
    g = torch.Generator().manual_seed(5)
    for kind in ("heads", "channels"):
        sat.tracker.score[kind].copy_(torch.rand(sat.tracker.score[kind].shape, generator=g, dtype=torch.float64))
        sat.tracker.seen[kind].fill_(True)
    rate = sat.begin_step(3)

    def kept(heads_channels):
        return [{k: v.tolist() for k, v in d.items()} for d in heads_channels]

    drawn = kept(select(sat.tracker, rate, cfg.granularity, selection=selection, seed=7, step=3))
    top = kept(select(sat.tracker, rate, cfg.granularity))
    assert rate == 0.5 and kept((sat.keep_heads, sat.keep_channels)) == drawn
    assert (drawn != top) == (selection == "sample")
