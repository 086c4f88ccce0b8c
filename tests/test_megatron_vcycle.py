"""V-cycle transitions on Megatron GPTModels (MegatronParams through engine.transitions, one HF parameter
at a time, TP-sharded) equal the pure HF operators on the gathered weights, at tp=1 and tp=2, tied and
untied: coalesce (width 2, depth 2), then de-coalesce + interpolate back into the large model.

Tolerance: the same fp32 index operations and means run on the same gathered tensors, but the depth
average is (a + b) / 2 here and a stacked mean in the state-dict reference: 1e-6 of each tensor's
scale allows their last-ulp difference and catches any misplaced row (of the size of the weights).
"""

import pytest
import torch

from ranks import run_ranks
from test_megatron_model import _config, _hf


def _close(got: dict, want: dict) -> dict:
    """Largest difference per tensor relative to its scale, and whether the key sets agree."""
    return {"keys": sorted(got) == sorted(want),
            "worst": max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)}


def _state(gpt, conf):
    """The HF state of a Megatron model, each parameter once (a tied head is the embedding)."""
    from ds_accel.megatron import hf_state_from_gpt

    state = hf_state_from_gpt(gpt, conf)
    if conf.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def _vcycle_worker():
    from ds_accel.engine.transitions import coalesce_into, decoalesce_into, keep_shards
    from ds_accel.megatron import MegatronParams, gpt_from_hf, init_parallel
    from ds_accel.multilevel import coalesce_state_dict, decoalesce_state_dict, interpolate_state_dict, level_map
    from megatron.core import parallel_state

    out = {}
    for tp in (1, 2):
        parallel_state.destroy_model_parallel()
        init_parallel(tp)
        for tied in (False, True):
            conf = _config(tie_word_embeddings=tied)
            hf = _hf(conf, seed=5)
            lmap = level_map(conf, 2, 2, "half")
            large, small = gpt_from_hf(hf), gpt_from_hf(lmap.small_config)
            large_params, small_params = MegatronParams.of(large, conf), MegatronParams.of(small, lmap.small_config)
            kept = keep_shards(large_params)
            coalesce_into(large_params, small_params, lmap)
            want_small, _ = coalesce_state_dict(_state(large, conf), conf, 2, 2, "half")
            got_small = _state(small, lmap.small_config)
            with torch.no_grad():  # the small level trains: every parameter moves, differently per TP block
                for p in small.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
            trained, large_before = _state(small, lmap.small_config), _state(large, conf)
            decoalesce_into(small_params, large_params, lmap, kept, alpha=0.3)
            want_large = interpolate_state_dict(
                large_before, decoalesce_state_dict(trained, lmap.small_config, conf, "half"), 0.3)
            got_large = _state(large, conf)
            out[tp, tied] = {"coalesce": _close(got_small, want_small), "decoalesce": _close(got_large, want_large),
                             "moved": max((got_large[k] - large_before[k]).abs().max().item() for k in large_before)}
    return out


@pytest.mark.distributed
def test_vcycle_transition_on_megatron_equals_hf_operators_at_tp1_and_tp2():
    for rank_out in run_ranks(_vcycle_worker, 2):
        assert len(rank_out) == 4
        for case, r in rank_out.items():
            assert r["coalesce"]["keys"] and r["decoalesce"]["keys"], case
            assert r["coalesce"]["worst"] <= 1e-6, (case, r)
            assert r["decoalesce"]["worst"] <= 1e-6, (case, r)
            assert r["moved"] > 1e-3  # the round trip is not the identity: the test sees the interpolation
