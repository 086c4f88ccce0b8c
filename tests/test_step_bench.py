"""The step benchmark's bookkeeping (its timings are read from its tables, not asserted here)."""
import statistics

import pytest
import torch
from transformers import LlamaConfig

from ds_accel import step_bench


def test_speedup_is_the_median_of_paired_rounds_and_the_flops_limit_is_the_selections():
    """Each (policy, rate) entry: the speedup is the median of dense's time over SAT's in the same round (not
    a ratio of medians taken apart), within its range; the FLOPs limit is dense's FLOPs over the kept
    units', which halving every layer's heads and channels makes at least 1.5x for this shape."""
    conf = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=64, max_position_embeddings=32)
    shape = step_bench.Shape("tiny", conf, 2, 16, True)
    result = step_bench.bench_shape(shape, [0.5], 3, torch.device("cpu"), torch.float32)
    assert set(result) == set(step_bench.POLICIES)
    for policy, by_rate in result.items():
        v = by_rate["0.5"]
        ratios = [d / s for d, s in zip(v["dense_ms_rounds"], v["sat_ms_rounds"])]
        assert len(ratios) == 3
        assert v["measured_speedup"] == pytest.approx(statistics.median(ratios), rel=1e-12), policy
        assert v["speedup_range"] == pytest.approx([min(ratios), max(ratios)], rel=1e-12)
        assert v["dense_ms"] == statistics.median(v["dense_ms_rounds"])
        assert v["flops_limit_speedup"] > 1.5
    line = step_bench.table({"shapes": {"tiny adam": {"tokens": 32, "policy": "adam", "rates": result["adam"]}}})
    assert "| tiny | 32 | adam | 0.5 |" in line.splitlines()[2]


def test_sat_step_records_importance_as_the_trainer_does(monkeypatch):
    """Every SAT step records its kept units' importance in the same forward and updates the scores, as the
    trainer's step does; the dense step, a run without SAT, records nothing."""
    conf = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=64, max_position_embeddings=32)
    calls, updates = [], []
    real_omit, real_update = step_bench.omit, step_bench.ImportanceTracker.update
    monkeypatch.setattr(step_bench, "omit", lambda model, heads, channels, tracker=None, **kw: calls.append(
        (bool(heads or channels), tracker)) or real_omit(model, heads, channels, tracker, **kw))
    monkeypatch.setattr(step_bench.ImportanceTracker, "update", lambda self: updates.append(self) or real_update(self))
    step_bench.bench_shape(step_bench.Shape("tiny", conf, 2, 16, True), [0.5], 2, torch.device("cpu"), torch.float32)
    sparse = [tracker for is_sparse, tracker in calls if is_sparse]
    assert sparse and all(t is not None for t in sparse) and len(updates) == len(sparse)
    assert all(tracker is None for is_sparse, tracker in calls if not is_sparse)
    assert all(bool(t.seen["channels"].any()) for t in updates)


def test_kept_width_model_computes_what_sat_does_at_half_rate():
    """The probes' kept-width model: per layer the widths SAT keeps at r = 0.5 (kv_group), hence the FLOPs
    of SAT's step, which the benchmark's FLOPs limit divides into dense's."""
    from ds_accel.flops import train_flops

    model, _ = step_bench._build(step_bench.catalogue()["small"], torch.device("cpu"), torch.float32)
    narrow = step_bench.kept_width_model(model)
    keep_heads, keep_channels = step_bench._selection(model, 0.5, "kv_group")
    widths = step_bench._widths(model, model.config, keep_heads, keep_channels)
    c = narrow.config
    assert {(w.q_heads, w.kv_heads, w.channels) for w in widths} == {
        (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)}
    assert train_flops(c, 1024, 128) == train_flops(model.config, 1024, 128, widths)
