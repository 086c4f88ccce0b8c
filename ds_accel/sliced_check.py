"""SAT's sliced step against a masked dense model on a given device: the CUDA correctness check of
``ds-accel gpu-check`` (the test suite runs it on the CPU).

The test suite checks the sliced forward and backward against independent references on the CPU; on a
GPU other kernels run (cuBLAS GEMMs of the sliced shapes, SDPA's flash kernel with and without its own
GQA, ``index_select`` / ``index_add_`` / ``index_copy_`` with device indices), so a GPU session
checks the same claim there. The reference is the dense HF model with the omitted heads' o_proj columns and
the omitted channels' down_proj columns set to zero: it computes the same function as the sliced model,
and gives every kept weight the same gradient. Two layers cover both attention paths: layer 0 keeps
query heads that share their KV heads evenly (SDPA's ``enable_gqa``), layer 1 an uneven set (per-head KV
copies); both keep half the MLP channels. In float32 (TF32 off) the two agree to float32 rounding; in
bf16 to bf16's. On CUDA it also counts the host synchronisations of both forward + backward passes (the
sliced one includes entering ``omit``): slicing must add none, since a wait per layer would leave the GPU
idle while Python issues the next layer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .runtime import host_syncs, no_tf32
from .sat import omit

HEADS, KV_HEADS, HEAD_DIM, CHANNELS, VOCAB, TOKENS = 8, 2, 32, 344, 512, 128
KEEP_HEADS = {0: [0, 1, 4, 5], 1: [1, 4, 6]}  # 4 query heads per KV head: 2 + 2 (even), 1 + 2 (uneven)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # largest relative error of the loss and any gradient


def _model(device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=CHANNELS,
                       num_hidden_layers=len(KEEP_HEADS), num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       tie_word_embeddings=False, max_position_embeddings=TOKENS)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(conf).to(device=device, dtype=dtype)


def _omitted(kept: list[int], n: int, width: int = 1) -> torch.Tensor:
    """The columns of the units not in ``kept`` (each unit ``width`` columns wide)."""
    return torch.tensor([u * width + j for u in range(n) if u not in kept for j in range(width)])


def _relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    x, reference = x.double(), reference.double()
    return ((x - reference).norm() / reference.norm().clamp(min=1e-30)).item()


def compare(device: str | torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """{"loss", "gradient" (largest relative error over the weights), "worst" (its weight), "omitted_zero"
    (every omitted column got exactly zero gradient), "paths" (layer 0 took SDPA's GQA, layer 1 the KV
    copies), "syncs" ({"dense", "sliced"}: :func:`ds_accel.runtime.host_syncs` of each forward + backward),
    "passed"}."""
    device = torch.device(device)
    model = _model(device, dtype)
    draw = {i: torch.randperm(CHANNELS, generator=torch.Generator().manual_seed(i)) for i in KEEP_HEADS}
    keep_channels = {i: order[:CHANNELS // 2].sort().values for i, order in draw.items()}
    keep_heads = {i: torch.tensor(h) for i, h in KEEP_HEADS.items()}
    reference = copy.deepcopy(model)
    omitted = {}
    with torch.no_grad():
        for i, kept in KEEP_HEADS.items():
            layer = reference.model.layers[i]
            heads, channels = _omitted(kept, HEADS, HEAD_DIM), _omitted(keep_channels[i].tolist(), CHANNELS)
            layer.self_attn.o_proj.weight[:, heads.to(device)] = 0
            layer.mlp.down_proj.weight[:, channels.to(device)] = 0
            omitted[f"model.layers.{i}.self_attn.o_proj.weight"] = heads
            omitted[f"model.layers.{i}.mlp.down_proj.weight"] = channels
    ids = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(1)).to(device)
    calls: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(bool(kwargs.get("enable_gqa")))
        return sdpa(*args, **kwargs)

    losses: dict[str, torch.Tensor] = {}

    def dense() -> None:
        losses["dense"] = reference(input_ids=ids, labels=ids, use_cache=False).loss
        losses["dense"].backward()

    def sliced() -> None:
        with omit(model, keep_heads, keep_channels):
            losses["sliced"] = model(input_ids=ids, labels=ids, use_cache=False).loss
            losses["sliced"].backward()

    with no_tf32():
        syncs = {"dense": host_syncs(dense, device)}
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            syncs["sliced"] = host_syncs(sliced, device)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    loss, ref_loss = losses["sliced"], losses["dense"]
    ref_params = dict(reference.named_parameters())
    worst, gradient, omitted_zero = "", 0.0, True
    for name, p in model.named_parameters():
        grad, ref_grad = p.grad.clone(), ref_params[name].grad.clone()
        if name in omitted:  # the reference's zeroed columns have a gradient of their own; the sliced's are 0
            columns = omitted[name].to(device)
            omitted_zero &= bool((grad[:, columns] == 0).all())
            grad[:, columns] = ref_grad[:, columns] = 0
        error = _relative(grad, ref_grad)
        if error > gradient:
            worst, gradient = name, error
    loss_error = _relative(loss.detach(), ref_loss.detach())
    tolerance = TOLERANCE[dtype]
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "loss": loss_error,
            "gradient": gradient, "worst": worst, "omitted_zero": omitted_zero, "paths": calls == [True, False],
            "syncs": syncs, "tolerance": tolerance,
            "passed": (loss_error <= tolerance and gradient <= tolerance and omitted_zero and calls == [True, False]
                       and (syncs["sliced"] is None or syncs["sliced"] <= syncs["dense"]))}


def run(device: str | torch.device) -> list[dict[str, Any]]:
    """:func:`compare` in float32 and bfloat16."""
    return [compare(device, dtype) for dtype in (torch.float32, torch.bfloat16)]
