"""Megatron backend, model level: the CPU shims apply (and are still needed), and a Megatron-core GPTModel
built by gpt_from_hf computes the HF Llama's function at tp=1 and tp=2, and gathers back to its exact state.

Tolerance of the logits, 1e-5 absolute on logits of size ~1 in fp32: both models run the same
arithmetic in a different order (Megatron's baddbmm + masked softmax against HF's SDPA, torch's
RMSNorm against HF's, TP's partial sums of linear_proj / linear_fc2 all-reduced): measured 3e-7 here,
a few float32 ulps per operation over two layers. A layout mistake (a swapped head, q/k/v or gate/up
rows, a wrong RoPE base or eps) moves them by 1e-2 or more. The round trip is a copy: exact."""

import pytest
import torch

from ranks import run_ranks


def _config(**changes):
    """GQA with 2 groups per TP rank at tp=2 (8 heads, 4 KV heads), a non-default RoPE base and eps,
    random norm weights (set in _hf) so every mapping shows in the logits."""
    from transformers import LlamaConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False)
    conf = LlamaConfig(**{**base, **changes})
    conf._attn_implementation = "sdpa"
    return conf


def _hf(conf, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if name.endswith("norm.weight") else 0.05)
                    + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def _still_needed() -> dict:
    """Each CUDA assumption still raises on this machine without its shim (before init_parallel installs them)."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random

    needed = {}
    for name, call in (("torch.cuda.current_device", torch.cuda.current_device),
                       ("causal mask", lambda: fused_softmax.get_default_causal_mask(4)),
                       ("model-parallel RNG tracker", lambda: mp_random.CudaRNGStatesTracker().add("x", 1))):
        try:
            call()
            needed[name] = False
        except (AssertionError, RuntimeError):
            needed[name] = True
    return needed


def _equivalence_worker():
    from ds_accel.megatron import MegatronCausalLM, _cpu, gpt_from_hf, hf_state_from_gpt, init_parallel
    from megatron.core import parallel_state
    from megatron.core.fusions import fused_softmax

    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    out = {"needed": _still_needed()}
    for tp in (1, 2):  # 2 ranks: tp=1 x dp=2, then tp=2
        parallel_state.destroy_model_parallel()
        init_parallel(tp)
        out["installed"] = _cpu.install()
        for tied in (False, True):
            conf = _config(tie_word_embeddings=tied)
            hf = _hf(conf, seed=int(tied))
            gpt = gpt_from_hf(hf)
            lm = MegatronCausalLM(gpt, conf).eval()
            with torch.no_grad():
                logits, ref = lm(input_ids=x).logits, hf(input_ids=x).logits
                loss, ref_loss = lm(input_ids=x, labels=x).loss, hf(input_ids=x, labels=x).loss
            state, ref_state = hf_state_from_gpt(gpt, conf), hf.state_dict()
            out[tp, tied] = {
                "logits": (logits - ref).abs().max().item(), "scale": ref.abs().max().item(),
                "loss": abs(loss.item() - ref_loss.item()),
                "keys": sorted(state) == sorted(ref_state),
                "exact": all(torch.equal(state[k], ref_state[k]) for k in ref_state),
                "local_qkv": tuple(gpt.decoder.layers[0].self_attention.linear_qkv.weight.shape),
                "local_fc1": tuple(gpt.decoder.layers[0].mlp.linear_fc1.weight.shape),
                "split": {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None))
                          for n, p in gpt.named_parameters()},
            }
    conf = _config()
    lm = MegatronCausalLM(gpt_from_hf(_hf(conf)), conf)
    lm(input_ids=x, labels=x).loss.backward()  # RoPE, attention's buffer, the mask and the dropout fork, backward too
    out["grads"] = all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())
    out["mask"] = bool(torch.equal(fused_softmax.get_default_causal_mask(3),
                                   torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)))
    return out


@pytest.mark.distributed
def test_gpt_from_hf_equals_hf_llama_at_tp1_and_tp2_and_round_trips_exactly():
    """Also the CPU shims: they apply only without CUDA, the forward and backward run with them, and each
    is still needed. Fails loudly when megatron-core changes what a shim patches (install() raises, or
    the step breaks) or no longer needs one (the original stops raising: drop that shim)."""
    from ds_accel.megatron import _cpu

    if torch.cuda.is_available():
        assert _cpu.install() == []
    for rank_out in run_ranks(_equivalence_worker, 2):
        if not torch.cuda.is_available():
            assert rank_out.pop("needed") == dict.fromkeys(_cpu.SHIMS, True)
            assert rank_out.pop("installed") == list(_cpu.SHIMS)
        assert rank_out.pop("grads") and rank_out.pop("mask")
        for (tp, tied), r in rank_out.items():
            assert r["scale"] > 0.1
            assert r["logits"] < 1e-5, (tp, tied, r)
            assert r["loss"] < 1e-5, (tp, tied, r)
            assert r["keys"] and r["exact"], (tp, tied)
            # each rank holds K/tp whole groups of (4 query + k + v) x head_dim 8 rows, and [gate_r; up_r]
            # split weights marked as Megatron's initialisation marks them (DeepSpeed's gradient norm reads it)
            for name, split in r["split"].items():
                dim = 1 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0
                assert split == ((False, None) if name.endswith("layernorm.weight") else (True, dim)), name
            assert r["local_qkv"] == (4 * (2 + 2) * 8 // tp, 64) and r["local_fc1"] == (2 * 96 // tp, 64)


def test_layout_refuses_uneven_tp_and_unsupported_llamas():
    from ds_accel.megatron.layout import check_tp, megatron_name

    check_tp(_config(), 4)
    with pytest.raises(ValueError, match=r"parallel\.tp: 8 does not divide the 4 KV heads"):
        check_tp(_config(), 8)
    with pytest.raises(ValueError, match=r"parallel\.tp: 3 does not divide the 4 KV heads"):
        check_tp(_config(num_key_value_heads=4), 3)
    with pytest.raises(ValueError, match=r"parallel\.tp: 2 does not divide the 127 vocabulary entries"):
        check_tp(_config(vocab_size=127), 2)
    with pytest.raises(ValueError, match="not a parameter of a HF Llama"):
        megatron_name("model.layers.0.self_attn.q_proj.bias", tied=False)
    assert megatron_name("lm_head.weight", tied=True) == "embedding.word_embeddings.weight"
