"""Multi-level operators against dense references built here from the spec's F / S / T matrices,
plus function preservation of width (de)coalescing on tiny float64 Llama models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from ds_accel.multilevel import (
    coalesce,
    coalesce_param,
    coalesce_state_dict,
    coalesced_config,
    decoalesce,
    decoalesce_param,
    decoalesce_state_dict,
    interpolate,
    interpolate_state_dict,
    large_layer_source,
    level_map,
    small_layer_sources,
)

DIMS = ("hidden", "heads", "mlp", "layers")
SHAPES = {  # name -> (hidden, q heads, kv heads, head_dim, attention/mlp bias)
    "mha": (64, 4, 4, 16, False),
    "gqa": (64, 8, 4, 8, False),
    "gqa4": (64, 8, 2, 8, False),
    "mha_bias": (64, 4, 4, 16, True),
}


@pytest.fixture(autouse=True)
def float64_rms_norm(monkeypatch):
    """HF's LlamaRMSNorm computes in float32 even for float64 inputs, which limits logit comparisons to
    ~1e-6; the tests compare at 1e-10, so the norm runs in the input dtype here (same formula)."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def make_config(shape="mha", tie=False, layers=4, intermediate=96, **overrides) -> LlamaConfig:
    hidden, heads, kv_heads, head_dim, bias = SHAPES[shape]
    fields = dict(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=101, tie_word_embeddings=tie,
        attention_bias=bias, mlp_bias=bias,
    )
    config = LlamaConfig(**{**fields, **overrides})
    config._attn_implementation = "eager"
    return config


def random_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """float64 model with O(1) activations, so logits depend on every parameter."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.normal_(0, 0.1)
    return model


def logits(model: LlamaForCausalLM) -> torch.Tensor:
    ids = torch.tensor([[3, 17, 42, 99, 0, 7, 64, 5]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def pairing_names(pairing) -> dict:
    return {d: pairing for d in DIMS} if isinstance(pairing, str) else {d: pairing.get(d, "half") for d in DIMS}


def groups(n, f, name):
    """Spec: `half` groups unit i with i + n/f, i + 2n/f, ...; `adjacent` groups f*i .. f*i + f - 1."""
    if name == "half":
        return [[i + k * (n // f) for k in range(f)] for i in range(n // f)]
    return [[f * i + k for k in range(f)] for i in range(n // f)]


def dense_F(n, f, name, unit=1):
    """Averaging matrix (n/f * unit x n * unit), 1/f on every neuron of every unit of a group."""
    F = torch.zeros(n // f * unit, n * unit, dtype=torch.float64)
    for i, members in enumerate(groups(n, f, name)):
        for a in members:
            for u in range(unit):
                F[i * unit + u, a * unit + u] = 1 / f
    return F


def dense_reference(config, f, pairing):
    """Per parameter kind: (coalesce, decoalesce) as dense products, written from the spec."""
    p = pairing_names(pairing)
    h = config.head_dim
    Fd = dense_F(config.hidden_size, f, p["hidden"])
    Fq = dense_F(config.num_attention_heads, f, p["heads"], h)
    Fk = dense_F(config.num_key_value_heads, f, p["heads"], h)
    Fm = dense_F(config.intermediate_size, f, p["mlp"])

    def S(F):
        return f * F

    def T(F):
        return f * F.T

    def linear(Fo, Fi):
        return (lambda W: Fo @ W @ S(Fi).T, lambda W: T(Fo) @ W @ T(Fi).T / f)

    def vector(Fo, scale=1.0):
        return (lambda g: scale * Fo @ g, lambda g: T(Fo) @ g / scale)

    tied = config.tie_word_embeddings
    embed = (lambda E: E @ Fd.T, lambda E: E @ T(Fd).T)
    return {
        "self_attn.q_proj.weight": linear(Fq, Fd),
        "self_attn.k_proj.weight": linear(Fk, Fd),
        "self_attn.v_proj.weight": linear(Fk, Fd),
        "self_attn.o_proj.weight": linear(Fd, Fq),
        "mlp.gate_proj.weight": linear(Fm, Fd),
        "mlp.up_proj.weight": linear(Fm, Fd),
        "mlp.down_proj.weight": linear(Fd, Fm),
        "self_attn.q_proj.bias": vector(Fq),
        "self_attn.k_proj.bias": vector(Fk),
        "self_attn.v_proj.bias": vector(Fk),
        "self_attn.o_proj.bias": vector(Fd),
        "mlp.gate_proj.bias": vector(Fm),
        "mlp.up_proj.bias": vector(Fm),
        "mlp.down_proj.bias": vector(Fd),
        "input_layernorm.weight": vector(Fd),
        "post_attention_layernorm.weight": vector(Fd),
        "model.norm.weight": vector(Fd, scale=f if tied else 1.0),
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed if tied else (lambda W: W @ S(Fd).T, lambda W: W @ T(Fd).T / f),
    }


def reference_for(name, table):
    return next(fns for kind, fns in table.items() if name.endswith(kind))


REFERENCE_CASES = [
    ("mha", 2, "half"), ("mha", 2, "adjacent"), ("gqa", 2, "half"), ("gqa4", 2, "half"),
    ("gqa", 2, {"hidden": "adjacent", "mlp": "adjacent"}), ("mha_bias", 2, "adjacent"),
    ("mha_bias", 2, {"heads": "adjacent"}), ("mha", 4, "half"), ("gqa", 4, "half"), ("mha", 4, "adjacent"),
]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("shape,f,pairing", REFERENCE_CASES)
def test_params_match_dense_reference(shape, f, pairing, tie):
    config = make_config(shape, tie=tie, layers=1)  # the layer index plays no role in width
    lmap = level_map(config, f, 1, pairing)
    table = dense_reference(config, f, pairing)
    small_shapes = {k: v.shape for k, v in LlamaForCausalLM(lmap.small_config).state_dict().items()}
    torch.manual_seed(1)
    for name, param in LlamaForCausalLM(config).double().state_dict().items():
        W, Ws = torch.randn_like(param), torch.randn(small_shapes[name], dtype=torch.float64)
        ref_coalesce, ref_decoalesce = reference_for(name, table)
        torch.testing.assert_close(coalesce_param(name, W, lmap), ref_coalesce(W), rtol=0, atol=1e-12)
        torch.testing.assert_close(decoalesce_param(name, Ws, lmap), ref_decoalesce(Ws), rtol=0, atol=1e-12)
        round_trip = decoalesce_param(name, coalesce_param(name, W, lmap), lmap)
        torch.testing.assert_close(round_trip, ref_decoalesce(ref_coalesce(W)), rtol=0, atol=1e-12)


SHAPE_CASES = [
    (shape, factors, pairing)
    for shape in ("mha", "gqa")
    for factors in ((2, 2), (2, 1), (1, 2))
    # GQA + adjacent heads splits KV groups (tested as an error below); keep heads on `half` there.
    for pairing in (
        "half",
        "adjacent" if shape == "mha"
        else {"hidden": "adjacent", "mlp": "adjacent", "layers": "adjacent"},
    )
]


@pytest.mark.parametrize("shape,factors,pairing", SHAPE_CASES)
def test_coalesced_shapes_and_config(shape, factors, pairing):
    config = make_config(shape)
    wf, df = factors
    small = coalesce(random_model(config), wf, df, pairing)
    c = small.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.num_hidden_layers) == (
        config.hidden_size // wf, config.num_attention_heads // wf, config.num_key_value_heads // wf,
        config.intermediate_size // wf, config.num_hidden_layers // df,
    )
    assert c.head_dim == config.head_dim and c.vocab_size == config.vocab_size
    assert config.hidden_size == SHAPES[shape][0], "input config must be untouched"
    expected = LlamaForCausalLM(c).state_dict()
    got = small.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert all(v.dtype == torch.float64 for v in got.values())
    assert decoalesce(small, config, pairing).config.num_hidden_layers == config.num_hidden_layers


PRESERVE_CASES = [
    ("mha", "half"), ("mha", "adjacent"), ("gqa", "half"), ("gqa4", "half"),
    ("gqa", {"hidden": "adjacent", "mlp": "adjacent"}), ("mha_bias", "adjacent"),
]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("shape,pairing", PRESERVE_CASES)
def test_width_decoalesce_and_coalesce_preserve_function(shape, pairing, tie):
    large_config = make_config(shape, tie=tie, layers=2)
    small = random_model(coalesced_config(large_config, 2, 1, pairing), seed=3)
    large = decoalesce(small, large_config, pairing)
    reference = logits(small)
    torch.testing.assert_close(logits(large), reference, rtol=1e-10, atol=1e-10 * reference.abs().max().item())

    # The decoalesced model has equal grouped units, so coalescing it is exact and function preserving.
    again = coalesce(large, 2, 1, pairing)
    for name, param in small.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], param, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits(again), reference, rtol=1e-10, atol=1e-10 * reference.abs().max().item())


def test_generic_large_model_is_not_preserved():
    """Guards the test above: a large model with unequal grouped units changes its logits."""
    large = random_model(make_config("mha", layers=2), seed=4)
    assert not torch.allclose(logits(coalesce(large, 2, 1)), logits(large), rtol=1e-3)


@pytest.mark.parametrize(
    "pairing,groups_expected,source_expected",
    [("half", [(0, 2), (1, 3)], [0, 1, 0, 1]), ("adjacent", [(0, 1), (2, 3)], [0, 0, 1, 1])],
)
def test_depth_groups_average_and_copy(pairing, groups_expected, source_expected):
    config = make_config("gqa", layers=4)
    large = random_model(config, seed=5)
    lmap = level_map(config, 1, 2, pairing)
    assert small_layer_sources(lmap) == groups_expected
    assert [large_layer_source(lmap, j) for j in range(4)] == source_expected

    small = coalesce(large, 1, 2, pairing)
    large_sd, small_sd = large.state_dict(), small.state_dict()
    for i, (a, b) in enumerate(groups_expected):
        for kind in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            mean = (large_sd[f"model.layers.{a}.{kind}"] + large_sd[f"model.layers.{b}.{kind}"]) / 2
            torch.testing.assert_close(small_sd[f"model.layers.{i}.{kind}"], mean, rtol=0, atol=1e-15)

    restored = decoalesce(small, config, pairing).state_dict()
    for j, i in enumerate(source_expected):
        for name, param in small_sd.items():
            if name.startswith(f"model.layers.{i}."):
                assert torch.equal(restored[name.replace(f"layers.{i}.", f"layers.{j}.", 1)], param)
    assert torch.equal(restored["model.norm.weight"], small_sd["model.norm.weight"])


def test_interpolate_ends_and_mean():
    config = make_config("gqa", layers=2)
    large, other = random_model(config, seed=6), random_model(config, seed=7)
    before = {k: v.clone() for k, v in large.state_dict().items()}
    ends = {alpha: interpolate(large, other, alpha).state_dict() for alpha in (0.0, 0.5, 1.0)}
    for name, param in large.state_dict().items():
        assert torch.equal(param, before[name]), "interpolate must not modify its inputs"
        assert torch.equal(ends[0.0][name], param)
        assert torch.equal(ends[1.0][name], other.state_dict()[name])
        torch.testing.assert_close(ends[0.5][name], (param + other.state_dict()[name]) / 2, rtol=0, atol=1e-15)
    mixed = interpolate(large, other, 0.5)
    assert mixed is not large
    assert mixed.model.embed_tokens.weight.data_ptr() != large.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="keys differ"):
        interpolate_state_dict(large.state_dict(), {"x": torch.zeros(1)}, 0.5)


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_and_model_api_agree(tie):
    config = make_config("gqa", tie=tie)
    pairing = {"layers": "adjacent", "mlp": "adjacent"}
    large = random_model(config, seed=8)
    small_sd, small_config = coalesce_state_dict(large.state_dict(), config, 2, 2, pairing)
    small = coalesce(large, 2, 2, pairing)
    assert small_config.to_dict() == small.config.to_dict()
    assert small_sd.keys() == small.state_dict().keys()
    for name, param in small.state_dict().items():
        assert torch.equal(small_sd[name], param)

    large_sd = decoalesce_state_dict(small_sd, small_config, config, pairing)
    restored = decoalesce(small, config, pairing)
    for name, param in restored.state_dict().items():
        assert torch.equal(large_sd[name], param)

    mixed = interpolate(large, restored, 0.25).state_dict()
    for name, param in interpolate_state_dict(large.state_dict(), large_sd, 0.25).items():
        assert torch.equal(mixed[name], param)
    if tie:
        assert small.lm_head.weight is small.model.embed_tokens.weight
        without_head = {k: v for k, v in large.state_dict().items() if k != "lm_head.weight"}
        assert "lm_head.weight" not in coalesce_state_dict(without_head, config, 2, 2, pairing)[0]


def test_keeps_dtype():
    config = make_config("gqa")
    lmap = level_map(config, 2, 2)
    w = torch.randn(config.num_attention_heads * config.head_dim, config.hidden_size, dtype=torch.bfloat16)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert coalesce_param(name, w, lmap).dtype == torch.bfloat16
    assert decoalesce_param(name, coalesce_param(name, w, lmap), lmap).dtype == torch.bfloat16
    small = coalesce(LlamaForCausalLM(config).to(torch.bfloat16), 2, 2)
    assert all(p.dtype == torch.bfloat16 for p in small.parameters())


@pytest.mark.parametrize(
    "overrides,factors,pairing,field",
    [
        (dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=5), (2, 1), "half", "num_attention_heads"),
        (dict(num_hidden_layers=3), (1, 2), "half", "num_hidden_layers"),
        (dict(num_attention_heads=8, num_key_value_heads=1, head_dim=8), (2, 1), "half", "num_key_value_heads"),
        ({}, (3, 1), "half", "hidden_size"),
        (dict(intermediate_size=97), (2, 1), "half", "intermediate_size"),
        (dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8), (2, 1), {"heads": "adjacent"},
         "num_key_value_heads"),
        ({}, (2, 2), "zigzag", "pairing"),
        ({}, (2, 2), {"width": "half"}, "pairing"),
        ({}, (0, 2), "half", "width_factor"),
    ],
)
def test_errors_name_the_field(overrides, factors, pairing, field):
    config = make_config("mha", **overrides)
    with pytest.raises(ValueError, match=field):
        level_map(config, *factors, pairing)


def test_other_errors():
    config = make_config("mha")
    with pytest.raises(ValueError, match="rotary_emb"):
        coalesce_param("model.rotary_emb.inv_freq", torch.zeros(8), level_map(config))
    shard = torch.zeros(config.hidden_size // 2, config.hidden_size)  # a TP shard of q_proj, not the whole weight
    with pytest.raises(ValueError, match="unsharded"):
        coalesce_param("model.layers.0.self_attn.q_proj.weight", shard, level_map(config))
    small = random_model(coalesced_config(config, 2, 2))
    with pytest.raises(ValueError, match="vocab_size"):
        decoalesce(small, make_config("mha", vocab_size=102))


HF_RMS_NORM_FORWARD = modeling_llama.LlamaRMSNorm.forward  # read at import, before any test patches it


@pytest.mark.parametrize("pairing", ["half", {"hidden": "adjacent", "mlp": "adjacent"}], ids=["half", "adjacent"])
@pytest.mark.parametrize("tie", [False, True])
def test_width_decoalesce_preserves_function_with_hf_rms_norm(monkeypatch, tie, pairing):
    """The same preservation as above through HF's own LlamaRMSNorm (this module's float64 patch undone),
    which casts its input to float32, normalises there and casts back: every norm output carries float32
    rounding (a few 2^-24 relative), and the small and the de-coalesced model may round differently (a mean
    over d/2 features against one over d with every feature twice), so the logits agree to float32's
    level, not float64's: 1e-5 of the largest logit over 2 layers (5 norms), where a wrong operator moves
    them by O(1). Measured: 1.4e-7 with adjacent hidden pairing; 5e-16 with half, where the de-coalesced
    hidden state is the small one twice over and float32 sums both alike."""
    monkeypatch.undo()
    assert modeling_llama.LlamaRMSNorm.forward is HF_RMS_NORM_FORWARD
    large_config = make_config("gqa", tie=tie, layers=2)
    small = random_model(coalesced_config(large_config, 2, 1, pairing), seed=3)
    reference = logits(small)
    torch.testing.assert_close(logits(decoalesce(small, large_config, pairing)), reference, rtol=1e-5,
                               atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("pairing,order", [("half", [0, 1, 0, 1]),  # GQA: heads pair by `half` (see SHAPE_CASES)
                                           ({"hidden": "adjacent", "mlp": "adjacent", "layers": "adjacent"}, [0, 0, 1, 1])],
                         ids=["half", "adjacent"])
@pytest.mark.parametrize("width", [1, 2])
def test_depth_decoalesce_repeats_the_small_models_layers(pairing, order, width):
    """What depth de-coalescing promises (spec: large layer j is a copy of the small layer its pair maps
    to): not the small model's function (depth coalescing averages layers and does not preserve it), but
    the small model with its decoder layers run in the order of G, half [0, 1, 0, 1] (the small model
    stacked on itself), adjacent [0, 0, 1, 1] (each layer twice in place); with width de-coalescing as
    well, exactly so (width preserves the function). Built by hand from the small model's own modules;
    and coalescing the de-coalesced model gives the small model back (a pair of copies averages to itself)."""
    import copy

    large_config = make_config("gqa", layers=4)
    small = random_model(coalesced_config(large_config, width, 2, pairing), seed=9)
    repeated = copy.deepcopy(small)
    repeated.model.layers = torch.nn.ModuleList([small.model.layers[i] for i in order])
    repeated.config.num_hidden_layers = len(order)
    large = decoalesce(small, large_config, pairing)
    ids = torch.tensor([[3, 17, 42, 99, 0, 7, 64, 5]])
    with torch.no_grad():  # no KV cache: the repeated modules share their layer index
        reference, got = (m(input_ids=ids, use_cache=False).logits for m in (repeated, large))
    assert not torch.allclose(reference, logits(small), rtol=1e-3), "repeating the layers must change the function"
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-10 * reference.abs().max().item())
    again = coalesce(large, width, 2, pairing).state_dict()
    for name, param in small.state_dict().items():
        torch.testing.assert_close(again[name], param, rtol=0, atol=1e-12)
