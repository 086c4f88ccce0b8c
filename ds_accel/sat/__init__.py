"""Sparsity-Accelerated Training (SAT) with the Ladder Omission Rate Scheduler (Ma et al., ACL 2024).

Pure torch + transformers; the training engine composes them per step:

    rate = lors.rate(step)
    keep_heads, keep_channels = select(tracker, rate)        # {} at rate 0: dense
    with omit(model, keep_heads, keep_channels, tracker):    # sliced forward/backward + importance
        loss = model(input_ids, labels=labels, use_cache=False).loss
        loss.backward()
    with guard_omitted(optimizer, omitted_slices(model, keep_heads, keep_channels)):
        optimizer.step()
    tracker.update()                                         # then average tracker.scores() over DP ranks
"""
from ds_accel.sat.importance import ImportanceTracker, channel_magnitude, head_magnitude
from ds_accel.sat.lors import LORS
from ds_accel.sat.omit import HeadSelection, kept_fraction, omit
from ds_accel.structure import decoder_layers
from ds_accel.sat.optim_guard import OmittedSlice, guard_omitted, omitted_slices
from ds_accel.sat.selection import num_kept, select, select_heads, select_topk, select_topk_balanced

__all__ = [
    "HeadSelection",
    "ImportanceTracker",
    "LORS",
    "OmittedSlice",
    "channel_magnitude",
    "decoder_layers",
    "guard_omitted",
    "head_magnitude",
    "kept_fraction",
    "num_kept",
    "omit",
    "omitted_slices",
    "select",
    "select_heads",
    "select_topk",
    "select_topk_balanced",
]
