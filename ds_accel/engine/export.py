"""Export a trained engine (any ZeRO stage, any V-cycle level) as a HF Llama directory.

Each parameter is consolidated in fp32 through DeepSpeed's ``safe_get_full_fp32_param`` (which
gathers ZeRO-3 shards and ZeRO-1/2 fragments), one at a time, and rank 0 alone keeps them and
writes ``save_pretrained`` output that ``LlamaForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from .. import runtime
from .params import full_param


def export_hf(engine, conf: LlamaConfig, out_dir: Path, tokenizer=None) -> Path:
    """Collective: every rank calls it; rank 0 writes ``out_dir``."""
    state = {}
    if hasattr(engine, "train_batch") and hasattr(engine, "grid"):  # pipeline: each stage sends its layers
        from ..parallel.pipeline import local_named_parameters

        local = {name: full_param(p).cpu() for name, p in local_named_parameters(engine.module)}
        parts = [None] * dist.get_world_size() if runtime.rank() == 0 else None
        dist.gather_object(local, parts, dst=0)
        if runtime.rank() == 0:
            state = {name: value for part in parts for name, value in part.items()}
    else:
        for name, p in engine.module.named_parameters():
            value = full_param(p)
            if runtime.rank() == 0:
                state[name] = value.cpu()
    return write_hf(state, conf, out_dir, tokenizer)


def write_hf(state: dict[str, torch.Tensor], conf: LlamaConfig, out_dir: Path, tokenizer=None) -> Path:
    """Rank 0 writes the gathered HF-named ``state`` as a ``save_pretrained`` directory (a tied head may
    be absent from it); every rank waits for it. Collective."""
    if runtime.rank() == 0:
        model = LlamaForCausalLM(conf)
        missing, unexpected = model.load_state_dict({n: v.cpu() for n, v in state.items()}, strict=False)
        tied = {"lm_head.weight"} if conf.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export: state does not match the config (missing {missing}, unexpected {unexpected})")
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(path), torch_dtype=dtype)
