"""SAT on a Megatron-core GPTModel equals SAT on the HF Llama with the same weights and selection, at tp=1
and tp=2: the loss, every gradient (gathered and mapped back to the HF layout), the importance scores of
the units each rank holds, and the omitted parameter slices.

The reference is ``ds_accel.sat.omit`` on HF Llama (itself tested against a masked dense model in
test_sat.py). Tolerances (fp32): both sides run the same sliced GEMMs in a different order (one fused
linear_qkv GEMM against three, Megatron's RoPE against HF's, TP's all-reduced partial sums), measured
up to 1e-6 relative; 1e-5 of each tensor's scale (the loss: absolute) catches any row or column of a
wrong head, KV group or channel, which moves a gradient by its own size.
"""

import pytest
import torch

from ranks import run_ranks
from test_megatron_model import _config, _hf

# selections on 8 query heads (4 KV heads) and 96 channels, two layers; under tp=2 rank 0 holds heads
# 0-3 (KV 0-1) and channels 0-47. A: layer 0 keeps KV head 0 whole, drops KV head 1, keeps one query
# head of KV heads 2 and 3; layer 1's kept heads and channels all sit on rank 0 (rank 1 computes none).
# B: layer 0 dense (recorded by hooks), layer 1 heads sliced, MLPs dense. A again over 2 micro-batches: the
# gradients accumulate in the step's weight slices and reach the weights at the last backward.
SELECTIONS = [
    ({0: [0, 1, 4, 6], 1: [0, 2]}, {0: list(range(0, 96, 3)), 1: list(range(5, 30))}),
    ({1: [3, 4, 5, 7]}, {}),
]


def _as_tensors(keep):
    return {layer: torch.tensor(kept) for layer, kept in keep.items()}


def _tracker(conf):
    from ds_accel.sat import ImportanceTracker

    return ImportanceTracker(range(conf.num_hidden_layers), conf.num_attention_heads, conf.num_key_value_heads,
                             conf.intermediate_size, conf.hidden_size // conf.num_attention_heads)


def _masks(shapes, slices, name_of):
    """{HF name: 1 on omitted elements} from omitted slices (``name_of``: slice -> HF or Megatron name)."""
    masks = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for s in slices:
        masks[name_of(s)].index_fill_(s.dim, s.index, 1.0)
    return masks


def _sat_worker():
    from ds_accel.megatron import MegatronCausalLM, MegatronParams, gpt_from_hf, init_parallel
    from ds_accel.megatron import sat as msat
    from ds_accel.sat import omit, omitted_slices
    from megatron.core import parallel_state

    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    out = []
    for tp in (1, 2):
        parallel_state.destroy_model_parallel()
        init_parallel(tp)
        conf = _config()
        hf = _hf(conf, seed=2).train()
        gpt = gpt_from_hf(hf)
        lm = MegatronCausalLM(gpt, conf).train()
        params = MegatronParams.of(gpt, conf)
        shard = msat.tensor_shard(gpt.decoder.layers[0])
        for (keep_heads, keep_channels), micro_batches in [(sel, 1) for sel in SELECTIONS] + [(SELECTIONS[0], 2)]:
            keep_heads, keep_channels = _as_tensors(keep_heads), _as_tensors(keep_channels)
            result = {"tp": tp}
            for name, model, target in (("hf", hf, hf), ("megatron", lm, gpt)):
                model.zero_grad()
                tracker = _tracker(conf)
                # the 2-micro-batch case: Megatron's selection resolved ahead (as SATController does), so the
                # step's context copies no index to the device
                selection = msat.resolve(gpt, keep_heads, keep_channels) if name == "megatron" and micro_batches == 2 \
                    else None
                copies, real = [], msat.to_device
                msat.to_device = lambda tensors, device: copies.append(len(tensors)) or real(tensors, device)
                try:  # delegates the GPTModel to ds_accel.megatron.sat; micro-batches share the step's weight slices
                    with omit(target, keep_heads, keep_channels, tracker, micro_batches=micro_batches,
                              selection=selection):
                        for batch in x.split(len(x) // micro_batches):
                            loss = model(input_ids=batch, labels=batch).loss
                            loss.backward()
                finally:
                    msat.to_device = real
                result[f"{name}_copies"] = len(copies)
                tracker.update()
                if name == "hf":
                    grads = {n: p.grad.clone() for n, p in hf.named_parameters()}
                else:
                    grads = {n: params.assemble(n, torch.zeros_like(p) if p.grad is None else p.grad)
                             for n, p in params.local.items()}  # a rank keeping no unit of a layer: no grad
                heads = range(8) if shard is None else shard.heads
                channels = range(96) if shard is None else shard.channels
                scores = [tracker.score["heads"][:, heads.start:heads.stop],
                          tracker.score["channels"][:, channels.start:channels.stop]]
                result[name] = {"loss": loss.item(), "grads": grads, "scores": [s.clone() for s in scores]}
            hf_slices = omitted_slices(hf, keep_heads, keep_channels)
            hf_mask = _masks(params.shapes, hf_slices, lambda s: f"model.layers.{s.layer}.{s.name}")
            meg_slices = msat.omitted_slices(gpt, keep_heads, keep_channels)
            locals_ = {(i, n): p for i, layer in enumerate(gpt.decoder.layers) for n, p in layer.named_parameters()}
            meg_mask = {}
            for s in meg_slices:
                meg_mask.setdefault((s.layer, s.name), torch.zeros_like(s.param)).index_fill_(s.dim, s.index, 1.0)
            assembled = {}
            for name, p in params.local.items():  # every HF tensor from the Megatron masks, through the layout
                key = next((k for k, q in locals_.items() if q is p), None)
                local = meg_mask.get(key, torch.zeros_like(p))
                assembled[name] = params.assemble(name, local)
            result["masks"] = (hf_mask, assembled)
            result["found"] = (msat.unit_shape(gpt.decoder.layers[1]), msat.is_megatron(lm),
                               msat.is_megatron(list(gpt.decoder.layers)), msat.is_megatron(hf))
            out.append(result)
    return out


@pytest.mark.distributed
def test_sat_on_megatron_equals_sat_on_hf_llama_at_tp1_and_tp2():
    from ds_accel.structure import UnitShape

    for rank_out in run_ranks(_sat_worker, 2):
        assert len(rank_out) == 2 * (len(SELECTIONS) + 1)
        for case, r in enumerate(rank_out):
            hf, meg = r["hf"], r["megatron"]
            assert r["hf_copies"] == 0  # HF's own indices go through ds_accel.sat.omit
            assert (r["megatron_copies"] == 0) == (case % (len(SELECTIONS) + 1) == len(SELECTIONS)), (r["tp"], case)
            assert meg["loss"] == pytest.approx(hf["loss"], abs=1e-5), (r["tp"], case)
            assert sorted(meg["grads"]) == sorted(hf["grads"])
            for name, want in hf["grads"].items():
                got, scale = meg["grads"][name], want.abs().max().item()
                assert scale > 0, name
                assert (got - want).abs().max().item() <= 1e-5 * scale, (r["tp"], case, name)
                assert torch.equal(got == 0, want == 0), (r["tp"], case, name)  # omitted rows exactly zero
            for got, want in zip(meg["scores"], hf["scores"]):
                assert torch.allclose(got, want, rtol=1e-5, atol=0), (r["tp"], case)
                assert (want > 0).any()
            assert r["found"] == (UnitShape(8, 4, 8, 96), True, True, False)
            hf_mask, meg_mask = r["masks"]
            assert any(m.any() for m in hf_mask.values())
            for name, want in hf_mask.items():
                assert torch.equal(meg_mask[name], want), (r["tp"], case, name)
