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
