"""Parallel layouts applied to a plain HF Llama (pipeline stages via DeepSpeed's PipelineModule)."""

from ds_accel.parallel.pipeline import (
    LlamaPipeBlock,
    causal_lm_loss,
    hf_state_dict,
    layer_specs,
    load_hf_state,
    pipeline_batches,
    pipeline_llama,
    validate_layout,
)

__all__ = [
    "LlamaPipeBlock",
    "causal_lm_loss",
    "hf_state_dict",
    "layer_specs",
    "load_hf_state",
    "pipeline_batches",
    "pipeline_llama",
    "validate_layout",
]
