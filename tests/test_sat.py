"""SAT core: sliced == masked, exact restore, optimizer guard, importance EMA, selection, LORS."""
import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ds_accel.sat import (LORS, ImportanceTracker, guard_omitted, kept_fraction, num_kept, omit,
                          omitted_slices, select, select_heads, select_topk, select_topk_balanced)
from ds_accel.sat.omit import StepSlices

HEADS, KV_HEADS, HEAD_DIM, CHANNELS, VOCAB = 8, 2, 4, 97, 61
# Layer 0: irregular GQA selection using both KV heads; layer 1: only KV head 0 is used.
KEEP_HEADS = {0: torch.tensor([1, 4, 6]), 1: torch.tensor([0, 3])}
KEEP_CHANNELS = {0: torch.randperm(CHANNELS, generator=torch.Generator().manual_seed(0))[:41].sort().values}


def tiny_model(attn: str = "sdpa", bias: bool = False, layers: int = 2, kv_heads: int = KV_HEADS,
               seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=CHANNELS,
                         num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                         tie_word_embeddings=True, attention_bias=bias, mlp_bias=bias, max_position_embeddings=64)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def batch(padded: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    out = {"input_ids": ids, "labels": labels, "use_cache": False}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        labels[1, 8:] = -100
        out["attention_mask"] = mask
    return out


def omitted(kept: torch.Tensor, n: int) -> torch.Tensor:
    return torch.tensor(sorted(set(range(n)) - set(kept.tolist())), dtype=torch.long)


def rows(heads: torch.Tensor) -> torch.Tensor:
    return (heads[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).flatten()


def expected_omissions() -> dict[str, tuple[int, torch.Tensor]]:
    """By hand: parameter name -> (dim, omitted indices) for KEEP_HEADS / KEEP_CHANNELS."""
    out = {}
    for layer, kept in KEEP_HEADS.items():
        q = rows(omitted(kept, HEADS))
        kv = rows(omitted(torch.unique(kept // (HEADS // KV_HEADS)), KV_HEADS))
        prefix = f"model.layers.{layer}.self_attn"
        out |= {f"{prefix}.q_proj.weight": (0, q), f"{prefix}.o_proj.weight": (1, q)}
        if kv.numel():
            out |= {f"{prefix}.k_proj.weight": (0, kv), f"{prefix}.v_proj.weight": (0, kv)}
    for layer, kept in KEEP_CHANNELS.items():
        c = omitted(kept, CHANNELS)
        prefix = f"model.layers.{layer}.mlp"
        out |= {f"{prefix}.gate_proj.weight": (0, c), f"{prefix}.up_proj.weight": (0, c),
                f"{prefix}.down_proj.weight": (1, c)}
    return out


def masked_reference(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Independent reference: omitted heads/channels contribute zero through zeroed o_proj/down_proj columns."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, kept in KEEP_HEADS.items():
            ref.model.layers[layer].self_attn.o_proj.weight[:, rows(omitted(kept, HEADS))] = 0
        for layer, kept in KEEP_CHANNELS.items():
            ref.model.layers[layer].mlp.down_proj.weight[:, omitted(kept, CHANNELS)] = 0
    return ref


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).norm() / reference.norm().clamp(min=1e-300)).item()


# HF's eager attention takes its softmax in float32, which bounds how close a float64 reference can be.
@pytest.mark.parametrize("attn,bias,padded,tolerance",
                         [("sdpa", False, False, 1e-8), ("sdpa", True, True, 1e-8), ("eager", True, True, 1e-6)])
def test_sliced_equals_masked_reference(attn, bias, padded, tolerance):
    model = tiny_model(attn, bias)
    ref = masked_reference(model)
    ref_loss = ref(**batch(padded)).loss
    ref_loss.backward()
    with omit(model, KEEP_HEADS, KEEP_CHANNELS):
        loss = model(**batch(padded)).loss
        loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=0)
    zeroed_columns = {f"model.layers.{l}.self_attn.o_proj.weight" for l in KEEP_HEADS}
    zeroed_columns |= {f"model.layers.{l}.mlp.down_proj.weight" for l in KEEP_CHANNELS}
    omissions = expected_omissions()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad, ref_grad = p.grad.clone(), ref_grads[name].grad.clone()
        if name in omissions:
            dim, index = omissions[name]
            assert torch.all(grad.index_select(dim, index) == 0), name
            if name in zeroed_columns:
                grad.index_fill_(dim, index, 0)
                ref_grad.index_fill_(dim, index, 0)
        assert relative_error(grad, ref_grad) < tolerance, name
    bias_name = "model.layers.0.self_attn.q_proj.bias"
    if bias:
        assert torch.all(dict(model.named_parameters())[bias_name].grad[rows(omitted(KEEP_HEADS[0], HEADS))] == 0)


def test_multi_head_attention_without_gqa():
    model = tiny_model(kv_heads=HEADS)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.layers[0].self_attn.o_proj.weight[:, rows(omitted(KEEP_HEADS[0], HEADS))] = 0
    with omit(model, {0: KEEP_HEADS[0]}, {}):
        loss = model(**batch()).loss
        loss.backward()
    assert torch.allclose(loss, ref(**batch()).loss, rtol=1e-10, atol=0)
    assert torch.all(model.model.layers[0].self_attn.k_proj.weight.grad[rows(omitted(KEEP_HEADS[0], HEADS))] == 0)


def test_gradient_checkpointing_recomputes_the_same_sliced_step():
    """Recomputation in the backward runs the sliced forward again and records the same statistics again,
    which leaves the averaged importance unchanged."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        tracker = ImportanceTracker.for_model(model)
        with omit(model, KEEP_HEADS, KEEP_CHANNELS, tracker):
            loss = model(**batch()).loss
            loss.backward()
        tracker.update()
        results.append((loss, [p.grad for p in model.parameters()], tracker.flat()))
    (loss, grads, scores), (gc_loss, gc_grads, gc_scores) = results
    assert torch.equal(loss, gc_loss) and torch.equal(scores, gc_scores)
    assert all(torch.equal(g, h) for g, h in zip(grads, gc_grads))


def assert_dense(model: LlamaForCausalLM) -> None:
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert "forward" not in module.__dict__ and not module._forward_pre_hooks


def test_leaving_the_context_restores_the_dense_model_exactly():
    model = tiny_model()
    dense = model(**batch()).logits
    tracker = ImportanceTracker.for_model(model)
    with omit(model, KEEP_HEADS, KEEP_CHANNELS, tracker):
        assert not torch.equal(model(**batch()).logits, dense)
    assert_dense(model)
    assert torch.equal(model(**batch()).logits, dense)
    with pytest.raises(RuntimeError), omit(model, KEEP_HEADS, KEEP_CHANNELS):
        raise RuntimeError
    assert_dense(model)


def test_rate_zero_and_all_kept_are_the_dense_forward_bit_for_bit():
    model = tiny_model()
    dense = model(**batch()).logits
    everything = {layer: torch.arange(HEADS) for layer in range(2)}
    all_channels = {layer: torch.arange(CHANNELS) for layer in range(2)}
    tracker = ImportanceTracker.for_model(model)
    for keep_heads, keep_channels in (({}, {}), (everything, all_channels)):
        with omit(model, keep_heads, keep_channels, tracker):
            assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
            assert torch.equal(model(**batch()).logits, dense)
    assert torch.all(tracker._count["heads"] == 2) and torch.all(tracker._count["channels"] == 2)


def test_wrapped_models_layer_lists_and_mappings_select_the_same_layers():
    model = tiny_model()
    with omit(model, KEEP_HEADS, KEEP_CHANNELS):
        expected = model(**batch()).logits
    wrapper = torch.nn.Module()
    wrapper.module = model
    layers = list(model.model.layers)
    for target in (wrapper, layers, dict(enumerate(layers))):
        with omit(target, KEEP_HEADS, KEEP_CHANNELS):
            assert torch.equal(model(**batch()).logits, expected)
    with pytest.raises(ValueError, match="index"):
        with omit(model, {5: torch.tensor([0])}, {}):
            pass


def test_kv_cache_is_refused_under_omission():
    model = tiny_model()
    with omit(model, KEEP_HEADS, {}), pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=batch()["input_ids"], use_cache=True)


def test_omitted_slices_match_the_hand_mapping_and_kept_fraction():
    model = tiny_model(bias=True)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(s.param)]: (s.dim, s.index) for s in omitted_slices(model, KEEP_HEADS, KEEP_CHANNELS)}
    expected = expected_omissions()
    expected |= {n.replace("weight", "bias"): v for n, v in expected.items() if v[0] == 0}
    assert got.keys() == expected.keys()
    assert all(got[n][0] == expected[n][0] and torch.equal(got[n][1], expected[n][1]) for n in got)
    fractions = kept_fraction(model, KEEP_HEADS, KEEP_CHANNELS)
    assert fractions == {"heads": 5 / 16, "kv_heads": 3 / 4, "channels": (41 + 97) / 194}


def adamw_after_sliced_step(guarded: bool):
    """A dense AdamW step (so moments are non-zero), then a sliced one; returns (before, after) snapshots."""
    model = tiny_model(bias=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(**batch(seed=2)).loss.backward()
    opt.step()
    opt.zero_grad()
    with omit(model, KEEP_HEADS, KEEP_CHANNELS):
        model(**batch()).loss.backward()
    slices = omitted_slices(model, KEEP_HEADS, KEEP_CHANNELS)

    def snapshot() -> dict[str, list[torch.Tensor]]:
        state = lambda p: (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
        return {s.name + str(s.layer): [t.detach().clone() for t in state(s.param)] for s in slices}

    before = snapshot()
    if guarded:
        with guard_omitted(opt, slices):
            opt.step()
    else:
        opt.step()
    return slices, before, snapshot()


def test_guard_keeps_omitted_parameters_and_moments_bit_identical():
    slices, before, after = adamw_after_sliced_step(guarded=True)
    for s in slices:
        key = s.name + str(s.layer)
        kept = omitted(s.index, s.param.shape[s.dim])
        for old, new in zip(before[key], after[key]):
            assert torch.equal(old.index_select(s.dim, s.index), new.index_select(s.dim, s.index)), key
            assert not torch.equal(old.index_select(s.dim, kept), new.index_select(s.dim, kept)), key


def test_without_the_guard_adamw_moves_omitted_rows():
    slices, before, after = adamw_after_sliced_step(guarded=False)
    for s in slices:
        key = s.name + str(s.layer)
        for old, new in zip(before[key], after[key]):
            assert not torch.equal(old.index_select(s.dim, s.index), new.index_select(s.dim, s.index)), key


def recorded_step(model: LlamaForCausalLM, tracker: ImportanceTracker, keep_heads: dict, keep_channels: dict
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One recording forward; returns layer 0's head and channel magnitudes computed by hand from the
    inputs of its attention and MLP in that forward (eager attention math, full MLP)."""
    layer, seen = model.model.layers[0], {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.update(attn=kw), with_kwargs=True),
             layer.mlp.register_forward_pre_hook(lambda m, a: seen.update(mlp=a[0]))]
    with torch.no_grad(), omit(model, keep_heads, keep_channels, tracker):
        model(**batch())
    tracker.update()
    for hook in hooks:
        hook.remove()
    attn, x = layer.self_attn, seen["attn"]["hidden_states"]
    heads = lambda w, n: (x @ w.T).view(*x.shape[:2], n, HEAD_DIM).transpose(1, 2)
    q, k = apply_rotary_pos_emb(heads(attn.q_proj.weight, HEADS), heads(attn.k_proj.weight, KV_HEADS),
                                *seen["attn"]["position_embeddings"])
    v = heads(attn.v_proj.weight, KV_HEADS)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    logits = logits.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), -math.inf)
    head_stat = (logits.softmax(-1) @ v).norm(dim=-1).mean(dim=(0, 2))
    mlp = layer.mlp
    a = F.silu(seen["mlp"] @ mlp.gate_proj.weight.T) * (seen["mlp"] @ mlp.up_proj.weight.T)
    return head_stat.float(), a.abs().mean(dim=(0, 1)).float()


def test_importance_ema_matches_hand_computation():
    model, decay = tiny_model(layers=1), 0.9
    tracker = ImportanceTracker.for_model(model, decay=decay)
    keep_heads, keep_channels = {0: KEEP_HEADS[0]}, {0: KEEP_CHANNELS[0]}
    head_stat, channel_stat = recorded_step(model, tracker, keep_heads, keep_channels)
    kept_h, kept_c = KEEP_HEADS[0], KEEP_CHANNELS[0]
    first_h, first_c = tracker.head_scores(0).clone(), tracker.channel_scores(0).clone()
    assert torch.allclose(first_h[kept_h], head_stat[kept_h], rtol=1e-6)
    assert torch.allclose(first_c[kept_c], channel_stat[kept_c], rtol=1e-6)
    assert torch.all(first_h[omitted(kept_h, HEADS)] == math.inf)
    head_stat, channel_stat = recorded_step(model, tracker, {}, {})
    expected_h = torch.where(torch.isinf(first_h), head_stat, decay * first_h + (1 - decay) * head_stat)
    expected_c = torch.where(torch.isinf(first_c), channel_stat, decay * first_c + (1 - decay) * channel_stat)
    assert torch.allclose(tracker.head_scores(0), expected_h, rtol=1e-6)
    assert torch.allclose(tracker.channel_scores(0), expected_c, rtol=1e-6)
    second_h, second_c = tracker.head_scores(0).clone(), tracker.channel_scores(0).clone()
    recorded_step(model, tracker, keep_heads, keep_channels)
    assert torch.equal(tracker.head_scores(0)[omitted(kept_h, HEADS)], decay * second_h[omitted(kept_h, HEADS)])
    assert torch.equal(tracker.channel_scores(0)[omitted(kept_c, CHANNELS)],
                       decay * second_c[omitted(kept_c, CHANNELS)])


def test_tracker_state_dict_and_flat_round_trip():
    model = tiny_model()
    tracker = ImportanceTracker.for_model(model)
    with torch.no_grad(), omit(model, KEEP_HEADS, KEEP_CHANNELS, tracker):
        model(**batch())
    tracker.update()
    restored = ImportanceTracker.for_model(model)
    restored.load_state_dict(tracker.state_dict())
    for layer in range(2):
        assert torch.equal(restored.head_scores(layer), tracker.head_scores(layer))
        assert torch.equal(restored.channel_scores(layer), tracker.channel_scores(layer))
    flat = tracker.flat()
    assert flat.numel() == 2 * (HEADS + CHANNELS)
    restored.set_flat(flat * 2)
    assert torch.equal(restored.flat(), flat * 2)
    rand_a, rand_b = (ImportanceTracker.for_model(model, metric="random", seed=3) for _ in range(2))
    rand_a.update()
    rand_b.load_state_dict(rand_a.state_dict())
    rand_a.update()
    rand_b.update()
    assert torch.equal(rand_a.flat(), rand_b.flat())
    with pytest.raises(ValueError, match="metric"):
        restored.load_state_dict(rand_a.state_dict())


def tracker_with(head_scores: list[float], channel_scores: list[float]) -> ImportanceTracker:
    """A one-layer tracker whose scores are the given values (recorded as activation magnitudes)."""
    tracker = ImportanceTracker([0], len(head_scores), KV_HEADS, len(channel_scores), HEAD_DIM)
    o_input = torch.zeros(1, 1, len(head_scores), HEAD_DIM)
    o_input[..., 0] = torch.tensor(head_scores)
    tracker.record_heads(0, o_input.flatten(-2))
    tracker.record_channels(0, torch.tensor(channel_scores).view(1, 1, -1))
    tracker.update()
    return tracker


def test_selection_follows_scores_with_deterministic_ties():
    assert select_topk(torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9]), 0.4).tolist() == [1, 2, 4]
    assert select_topk(torch.tensor([0.5, 0.9, 0.5, 0.5]), 0.5).tolist() == [0, 1]
    assert select_topk(torch.ones(4), 0.5).tolist() == [0, 1]
    assert select_topk(torch.arange(5.0), 0.0).tolist() == [0, 1, 2, 3, 4]
    assert (num_kept(10, 0.7), num_kept(97, 0.5), num_kept(4, 0.99)) == (3, 49, 1)
    balanced = select_topk_balanced(torch.tensor([9.0, 8, 7, 6, 0, 1, 2, 3]), 0.5, 2)
    assert balanced.tolist() == [0, 1, 6, 7]
    with pytest.raises(ValueError, match="omission_rate"):
        select_topk(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="num_shards"):
        select_topk_balanced(torch.ones(6), 0.5, 4)


@pytest.mark.parametrize("kept,even", [([0, 1, 4, 5], True), ([4, 5, 6, 7], True), ([1, 4, 6], False)])
@pytest.mark.parametrize("padded", [False, True])
def test_evenly_shared_kv_heads_use_sdpa_gqa(kept, even, padded, monkeypatch):
    """Kept KV heads serving equally many kept query heads go to SDPA's own GQA (as HF's dense attention
    does without a mask); the result equals the masked reference either way."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    omitted_rows = rows(omitted(torch.tensor(kept), HEADS))
    with torch.no_grad():
        ref.model.layers[0].self_attn.o_proj.weight[:, omitted_rows] = 0
    ref_loss = ref(**batch(padded)).loss
    ref_loss.backward()
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("enable_gqa")) or sdpa(*a, **k))
    with omit(model, {0: torch.tensor(kept)}, {}):
        loss = model(**batch(padded)).loss
        loss.backward()
    assert calls[0] is (even and not padded)  # layer 0 is sliced, layer 1 is HF's dense attention
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad, ref_grad = p.grad.clone(), ref_params[name].grad.clone()
        if name == "model.layers.0.self_attn.o_proj.weight":
            assert torch.all(grad[:, omitted_rows] == 0)
            grad[:, omitted_rows] = ref_grad[:, omitted_rows] = 0
        assert relative_error(grad, ref_grad) < 1e-8, name


def test_attend_follows_either_use_gqa_in_sdpa_signature(monkeypatch):
    """transformers' use_gqa_in_sdpa took (mask, key) before it took (mask, key, value): either is asked."""
    omit_module = sys.modules["ds_accel.sat.omit"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    q_to_kv = torch.tensor([0, 0, 1, 1])
    expected = F.scaled_dot_product_attention(q, k.index_select(1, q_to_kv), v.index_select(1, q_to_kv),
                                              is_causal=True)
    asked = []
    for takes_value, answer in ((True, lambda mask, key, value: asked.append(3) or True),
                                (False, lambda mask, key: asked.append(2) or True)):
        monkeypatch.setattr(omit_module, "_GQA_TAKES_VALUE", takes_value)
        monkeypatch.setattr(omit_module, "use_gqa_in_sdpa", answer)
        out = omit_module.attend(q, k, v, q_to_kv, True, None, is_causal=True)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert asked == [3, 2]


def test_kv_group_granularity_keeps_whole_groups():
    tracker = tracker_with([10, 0, 0, 0, 3, 3, 3, 3], [float(c % 7) for c in range(CHANNELS)])
    assert select_heads(tracker, 0, 0.75).tolist() == [0, 4]
    assert select_heads(tracker, 0, 0.5, "kv_group").tolist() == [4, 5, 6, 7]
    assert select_heads(tracker, 0, 0.5, "kv_group", num_shards=2).tolist() == list(range(8))
    assert select_heads(tracker, 0, 0.5, num_shards=2).tolist() == [0, 1, 4, 5]
    keep_heads, keep_channels = select(tracker, 0.5)
    assert keep_heads[0].numel() == 4 and keep_channels[0].numel() == 49
    assert torch.equal(keep_channels[0], select_topk(tracker.channel_scores(0), 0.5))
    assert select(tracker, 0.0) == ({}, {})
    with pytest.raises(ValueError, match="granularity"):
        select_heads(tracker, 0, 0.5, "channel")


def test_unseen_units_are_selected_first():
    tracker = ImportanceTracker([0], HEADS, KV_HEADS, CHANNELS, HEAD_DIM)
    first = select_topk(tracker.channel_scores(0), 0.5)
    tracker.record_channels(0, torch.ones(1, 1, first.numel()), kept=first)
    tracker.update()
    second = select_topk(tracker.channel_scores(0), 0.5)
    assert set(second.tolist()) >= set(omitted(first, CHANNELS).tolist())


def test_scores_reach_the_host_in_one_copy(monkeypatch):
    """engine.sat._on_host: the tracker's scores and seen-marks, every kind, arrive on the host in one
    ``.cpu()`` (each one a wait for the device on a GPU), with their values and dtypes, and selection
    from the host copy equals selection from the tracker."""
    from ds_accel.engine.sat import _on_host

    tracker = ImportanceTracker([0, 1], HEADS, KV_HEADS, CHANNELS, HEAD_DIM)
    first = select_topk(tracker.channel_scores(0), 0.5)
    tracker.record_channels(0, torch.rand(1, 3, first.numel()), kept=first)
    tracker.record_heads(1, torch.rand(1, 3, HEADS * HEAD_DIM))
    tracker.update()
    copies, real = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: copies.append(t.shape) or real(t, *a, **k))
    host = _on_host(tracker)
    assert len(copies) == 1
    for kind in tracker.score:
        assert host.score[kind].dtype == tracker.score[kind].dtype and torch.equal(host.score[kind],
                                                                                   tracker.score[kind])
        assert host.seen[kind].dtype == tracker.seen[kind].dtype and torch.equal(host.seen[kind], tracker.seen[kind])
    assert tracker.seen["channels"].any() and not tracker.seen["channels"].all()  # a partly seen case
    for ours, theirs in zip(select(host, 0.5), select(tracker, 0.5)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[i], theirs[i]) for i in ours)


def test_lors_ladder():
    lors = LORS(total_steps=100, omission_rate=0.5, stage1_fraction=0.5, rungs=4)
    rates = [lors.rate(s) for s in range(100)]
    assert rates[:50] == [0.5] * 50
    assert sorted(set(rates), reverse=True) == [0.5, 0.5 * 2 / 3, 0.5 / 3, 0.0]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[-13:] == [0.0] * 13 and rates[-14] > 0
    assert [rates[50:].count(r) for r in sorted(set(rates[50:]), reverse=True)] == [12, 13, 12, 13]
    assert lors.rate(100) == lors.rate(10_000) == 0.0
    assert all(LORS(10, 0.5, 0.5, rungs=1).rate(s) == 0.0 for s in range(5, 10))
    assert [LORS(4, 0.5, 0.5, rungs=4).rate(s) for s in range(4)] == [0.5, 0.5, 0.5 * 2 / 3, 0.0]


def test_lors_constant_and_linear():
    assert all(LORS(10, 0.3, schedule="constant").rate(s) == 0.3 for s in range(10))
    linear = [LORS(10, 0.5, 0.6, schedule="linear").rate(s) for s in range(10)]
    assert linear[:6] == [0.5] * 6 and linear[6:] == pytest.approx([0.5, 1 / 3, 1 / 6, 0.0])
    assert LORS(10, schedule="linear").rate(10) == 0.0


@pytest.mark.parametrize("kwargs,field", [
    ({"total_steps": 0}, "total_steps"), ({"total_steps": 10, "omission_rate": 1.0}, "omission_rate"),
    ({"total_steps": 10, "stage1_fraction": 1.5}, "stage1_fraction"), ({"total_steps": 10, "rungs": 0}, "rungs"),
({"total_steps": 10, "schedule": "cosine"}, "schedule")])
def test_lors_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LORS(**kwargs)


def test_omission_turns_the_kv_cache_off_by_itself():
    """Training under omit() needs no use_cache=False: the context switches caching off (as HF does under
    gradient checkpointing) and restores the config's setting when it ends."""
    model = tiny_model()
    model.config.use_cache = True
    with omit(model, KEEP_HEADS, KEEP_CHANNELS):
        out = model(input_ids=batch()["input_ids"])
        assert out.past_key_values is None and model.config.use_cache is False
    assert model.config.use_cache is True


def _accumulated_step(micro_batches: int, per_micro_batch: bool):
    """Loss and gradients of 4 micro-batches: one omit() context for the step (slices taken once), or
    one context per micro-batch (slices and gradient scatter every time)."""
    model = tiny_model(bias=True)
    losses, gathers = [], 0
    if per_micro_batch:
        for seed in range(micro_batches):
            with omit(model, KEEP_HEADS, KEEP_CHANNELS, keep_slices=False) as slices:
                loss = model(**batch(seed=seed)).loss / micro_batches
                loss.backward()
            losses.append(loss.detach())
            gathers += slices.gathers
    else:
        with omit(model, KEEP_HEADS, KEEP_CHANNELS, micro_batches=micro_batches) as slices:
            for seed in range(micro_batches):
                loss = model(**batch(seed=seed)).loss / micro_batches
                loss.backward()
                losses.append(loss.detach())
                if seed < micro_batches - 1:  # the weights get their gradient at the last backward only
                    assert all(p.grad is None for n, p in model.named_parameters() if "q_proj" in n)
        gathers = slices.gathers
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}, gathers


def test_slicing_once_per_step_equals_slicing_per_micro_batch():
    """Gradient accumulation over 4 micro-batches: the once-per-step slices give the per-micro-batch
    implementation's losses and gradients (float64; only the summation order of the gradient differs:
    the slice accumulates and is scattered once instead of four scatters), and gather each sliced weight
    once instead of four times."""
    once_loss, once_grads, once_gathers = _accumulated_step(4, per_micro_batch=False)
    each_loss, each_grads, each_gathers = _accumulated_step(4, per_micro_batch=True)
    assert torch.equal(once_loss, each_loss)
    for name, grad in each_grads.items():
        assert relative_error(once_grads[name], grad) < 1e-13, name
    # with biases: q/k/v weights and biases and the o_proj weight per sliced attention; gate/up weights and
    # biases and the down_proj weight per sliced MLP
    sliced_weights = 7 * len(KEEP_HEADS) + 5 * len(KEEP_CHANNELS)
    assert once_gathers == sliced_weights and each_gathers == 4 * sliced_weights


def test_an_unfinished_accumulated_step_is_an_error():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="3 backward passes ran for micro_batches=4"):
        with omit(model, KEEP_HEADS, KEEP_CHANNELS, micro_batches=4):
            for seed in range(3):
                model(**batch(seed=seed)).loss.backward()


def test_direct_slices_for_one_forward_except_large_weights_on_a_gpu():
    """index_select's own backward (index_add_) only where it is the cheaper scatter: one forward per weight,
    on the CPU or with small weights; on a GPU with Llama-2-7B-sized weights the gather-once function's
    index_copy_ (docs/benchmark/gpu/probe/)."""
    from ds_accel.sat.omit import slice_directly

    cpu, cuda, seven_b_down = torch.device("cpu"), torch.device("cuda", 0), 4096 * 11008
    assert slice_directly(cpu, 1, 1, False, seven_b_down) and slice_directly(cuda, 1, 1, False, 256 * 688)
    assert not slice_directly(cuda, 1, 1, False, seven_b_down)
    assert not slice_directly(cpu, 2, 2, False, 256) and not slice_directly(cpu, 1, 2, False, 256)
    assert not slice_directly(cpu, 1, 1, True, 256)


def test_direct_slices_stay_correct_when_a_weight_is_used_twice():
    """Plain index_select slices (one micro-batch, no recomputation) are chosen by omit(); if a weight is used
    twice after all, each use gathers again and the gradients add: two micro-batches in one such context
    give the gather-once implementation's gradients (float64), with twice the gathers."""
    model = tiny_model(bias=True)
    with omit(model, KEEP_HEADS, KEEP_CHANNELS) as slices:
        assert slices.direct
        for seed in range(2):
            (model(**batch(seed=seed)).loss / 2).backward()
    direct = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, once_grads, once_gathers = _accumulated_step(2, per_micro_batch=False)
    for name, grad in once_grads.items():
        assert relative_error(direct[name], grad) < 1e-13, name
    assert slices.gathers == 2 * once_gathers
    with pytest.raises(ValueError, match="direct=True.*micro_batches=1"):
        StepSlices(micro_batches=2, direct=True)


def test_gradients_every_backward_of_an_accumulated_step_keep_gathering_once():
    """An engine that takes the gradients at every backward (ZeRO-2) of a 2-micro-batch step calls
    omit(micro_batches=1, forwards=2): the slices stay the gather-once kind (one gather per weight for
    the step), the weights get their gradient at each backward, and the step's gradients are the
    gather-once step's (float64)."""
    model = tiny_model(bias=True)
    with omit(model, KEEP_HEADS, KEEP_CHANNELS, forwards=2) as slices:
        assert not slices.direct
        for seed in range(2):
            (model(**batch(seed=seed)).loss / 2).backward()
            assert all(p.grad is not None for n, p in model.named_parameters() if "q_proj" in n)
    _, once_grads, once_gathers = _accumulated_step(2, per_micro_batch=False)
    for name, p in model.named_parameters():
        assert relative_error(p.grad, once_grads[name]) < 1e-13, name
    assert slices.gathers == once_gathers


@pytest.mark.parametrize("seed", range(40))
def test_fragment_plan_reads_exactly_the_omitted_elements_of_any_flat_range(seed):
    """A flat fragment [start, start + numel) of a (rows, cols) weight, omitted rows or columns: the plan's
    reads are the omitted elements in the fragment (checked against a boolean mask over the whole weight),
    and a write-back restores exactly them."""
    from ds_accel.sat.optim_guard import FragmentPlan

    g = torch.Generator().manual_seed(seed)
    rows_, cols = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
    dim = seed % 2
    n = (rows_, cols)[dim]
    index = torch.randperm(n, generator=g)[:int(torch.randint(0, n + 1, (1,), generator=g))].sort().values
    start = int(torch.randint(0, rows_ * cols, (1,), generator=g))
    numel = int(torch.randint(1, rows_ * cols - start + 1, (1,), generator=g))
    mask = torch.zeros(rows_, cols, dtype=torch.bool)
    mask.index_fill_(dim, index, True)
    in_fragment = mask.flatten()[start:start + numel]
    plan = FragmentPlan.build((rows_, cols), dim, index, start, numel)
    fragment = torch.randn(numel, generator=g, dtype=torch.float64)
    saved = plan.save(fragment)
    read = torch.cat([s.flatten() for s in saved] or [fragment[:0]])
    assert sorted(read.tolist()) == sorted(fragment[in_fragment].tolist())
    assert plan.numel == int(in_fragment.sum())
    changed = fragment + 1
    plan.restore(changed, saved)
    assert torch.equal(changed[in_fragment], fragment[in_fragment])
    assert torch.equal(changed[~in_fragment], fragment[~in_fragment] + 1)


def test_resolve_cache_resolves_again_only_for_another_selection_or_model():
    """The trainer re-selects every step and mostly gets the same kept units: those are resolved once. Equal
    indices in new tensors reuse the resolution; one changed index, another model or another call's empty
    selection resolve again, each result equal to resolve()'s own."""
    from ds_accel.sat.omit import ResolveCache, resolve

    calls = []

    def counted(*args):
        calls.append(args)
        return resolve(*args)

    model, other = tiny_model(), tiny_model()
    cache = ResolveCache(counted)
    first = cache(model, KEEP_HEADS, KEEP_CHANNELS)
    copies = ({k: v.clone() for k, v in keep.items()} for keep in (KEEP_HEADS, KEEP_CHANNELS))
    again = cache(model, *copies)
    assert again is first and len(calls) == 1
    changed_heads = {**KEEP_HEADS, 1: torch.tensor([0, 2])}
    for heads, channels, target in ((changed_heads, KEEP_CHANNELS, model), (KEEP_HEADS, KEEP_CHANNELS, other),
                                    ({}, {}, other), (KEEP_HEADS, {}, other)):
        got = cache(target, heads, channels)
        assert _same_selection(got, resolve(target, heads, channels))
    assert len(calls) == 5


def test_resolved_selection_copies_its_indices_once_per_device_and_shard(monkeypatch):
    """omit() with the same resolution (the trainer's steps between selection changes) builds and copies its
    index tensors once; the sliced step is the same either way; another shard, or a plain dict, copies anew."""
    from ds_accel.sat.omit import device_indices, resolve
    from ds_accel.structure import TensorShard

    omit_module = sys.modules["ds_accel.sat.omit"]
    copies = []
    real = omit_module.to_device
    monkeypatch.setattr(omit_module, "to_device",
                        lambda tensors, device: copies.append(len(tensors)) or real(tensors, device))
    model = tiny_model()
    data = torch.randint(0, model.config.vocab_size, (2, 8))
    selection = resolve(model, KEEP_HEADS, KEEP_CHANNELS)
    grads = []
    for _ in range(2):
        with omit(model, KEEP_HEADS, KEEP_CHANNELS, selection=selection):
            model(input_ids=data, labels=data).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert len(copies) == 1 and copies[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    layers = dict(enumerate(model.model.layers))
    cpu = torch.device("cpu")
    assert device_indices(selection, layers, None, cpu) is selection.on_device[1]
    config = model.config
    shard = TensorShard(range(config.num_attention_heads), range(config.intermediate_size), lambda x: x, lambda x: x)
    device_indices(selection, layers, shard, cpu)
    assert len(copies) == 2 and selection.on_device[0] == (cpu, shard)
    plain = dict(selection)
    device_indices(plain, layers, None, cpu)
    device_indices(plain, layers, None, cpu)
    assert len(copies) == 4


def test_freeze_plans_are_built_once_per_selection(monkeypatch):
    """The controller keeps the ``freeze`` guard's omitted slices and fragment plans with the resolved
    selection: a step that reuses the selection (reselect_every 2) builds no plan, a new selection builds
    them again, and every step leaves the omitted rows and their AdamW moments bit-identical."""
    from ds_accel.config import OptimConfig, SATConfig
    from ds_accel.engine.build import adamw
    from ds_accel.engine.sat import SATController
    from ds_accel.sat.optim_guard import FragmentPlan

    builds = []
    real = FragmentPlan.build.__func__
    monkeypatch.setattr(FragmentPlan, "build", classmethod(lambda cls, *a: builds.append(1) or real(cls, *a)))
    model = tiny_model()
    opt = adamw(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    cfg = SATConfig(enabled=True, omission_rate=0.5, stage1_fraction=1.0, optimizer_policy="freeze",
                    metric="random", reselect_every=2)
    sat = SATController(cfg, model, total_steps=4, seed=0)
    sat.attach(opt)
    per_step, keeps = [], []
    for step in range(4):
        sat.begin_step(step)
        keeps.append({k: v.tolist() for k, v in sat.keep_channels.items()})
        before = {id(p): [p.detach().clone()] + [opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")]
                  for p in model.parameters() if p in opt.state}
        with sat.omitting():
            model(**batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sat.end_step()
        per_step.append(len(builds))
        for s in sat.omitted():
            after = [s.param.detach()] + [opt.state[s.param][k] for k in ("exp_avg", "exp_avg_sq")]
            for old, new in zip(before.get(id(s.param), []), after):
                assert torch.equal(old.index_select(s.dim, s.index), new.index_select(s.dim, s.index)), s.name
    assert keeps[0] == keeps[1] and keeps[2] == keeps[3] and keeps[1] != keeps[2]
    assert per_step[0] > 0 and per_step[1] == per_step[0]
    assert per_step[2] > per_step[1] and per_step[3] == per_step[2]


def test_controller_counts_selections_that_change_the_kept_set():
    """``selection_changes`` counts the selections that kept another set than the one before: the first one,
    then only new scores (``random`` redraws them at each ``end_step``) that pick other units; re-selecting
    with the scores unchanged is a selection but no change."""
    from ds_accel.config import SATConfig
    from ds_accel.engine.sat import SATController

    cfg = SATConfig(enabled=True, omission_rate=0.5, stage1_fraction=1.0, metric="random")
    sat = SATController(cfg, tiny_model(), total_steps=8, seed=0)
    sat.begin_step(0)
    first = {k: v.tolist() for k, v in sat.keep_channels.items()}
    sat.begin_step(1)  # no end_step: the same scores
    assert {k: v.tolist() for k, v in sat.keep_channels.items()} == first
    assert (sat.selections, sat.selection_changes) == (2, 1)
    sat.end_step()
    sat.begin_step(2)
    assert {k: v.tolist() for k, v in sat.keep_channels.items()} != first
    assert (sat.selections, sat.selection_changes) == (3, 2)


def test_controller_is_dense_once_the_rate_reaches_zero(monkeypatch):
    """LORS's rates never rise, so from the first rate-0 step no later selection reads importance: the
    controller selects every unit once (a change from the sparse set), then averages, selects and records
    nothing, and its step is the plain dense step: the model runs HF's own forward, loss and gradients
    bit for bit those of the model outside the controller."""
    from ds_accel.config import SATConfig
    from ds_accel.engine.sat import SATController

    cfg = SATConfig(enabled=True, omission_rate=0.5, stage1_fraction=0.5, rungs=2)
    model = tiny_model()
    sat = SATController(cfg, model, total_steps=8, seed=0)
    averaged = []
    real_average = SATController._average_scores
    monkeypatch.setattr(SATController, "_average_scores", lambda self: averaged.append(1) or real_average(self))
    rates, scores, counts = [], [], []
    for step in range(8):
        rates.append(sat.begin_step(step))
        counts.append((sat.selections, sat.selection_changes, len(averaged)))
        with sat.omitting():
            swapped = any("forward" in vars(m) for layer in model.model.layers for m in (layer.self_attn, layer.mlp))
            loss = model(**batch(seed=step)).loss
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        sat.end_step()
        scores.append(sat.tracker.flat().clone())
        if rates[-1] == 0:
            assert not swapped and not (sat.keep_heads or sat.keep_channels)
            plain = model(**batch(seed=step)).loss
            plain.backward()
            assert torch.equal(plain, loss) and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
            model.zero_grad(set_to_none=True)
        else:
            assert swapped
    assert rates == [0.5] * 6 + [0.0] * 2
    assert counts[6] == (7, counts[5][1] + 1, 6) and counts[7] == counts[6]  # one selection of everything
    assert torch.equal(scores[5], scores[6]) and torch.equal(scores[6], scores[7])  # nothing recorded
    assert not torch.equal(scores[4], scores[5])


def _same_selection(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False

    def flat(sel):
        out = []
        for layer in sel.values():
            heads = [] if layer.heads is None else [layer.heads.q_heads, layer.heads.kv_heads]
            out += [*heads, layer.channels]
        return out
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(flat(a), flat(b)))
