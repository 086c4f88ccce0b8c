"""Adam-moment transfer (``multilevel.optimizer_policy: transfer``): the moments map as gradients map.

The reference is autograd: a large model that is a width-decoalesced small one computes the small
one's function, so its gradients are tied to the small model's exactly, and Adam's moments built from
either side's gradients must map onto each other. Then cases worked by hand for the three kinds of
gradient scale r (output-only, both, input-only dimensions), including the round trip.
"""

import pytest
import torch

from test_multilevel_operators import float64_rms_norm, make_config, random_model  # noqa: F401 (autouse fixture)
from ds_accel.multilevel import (
    coalesce_grad,
    coalesce_moments,
    coalesced_config,
    decoalesce,
    decoalesce_grad,
    decoalesce_moments,
    decoalesce_param,
    coalesce_param,
    gradient_scale,
    level_map,
)

BETAS = (0.9, 0.95)


def _grads(model, ids):
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    loss = model(input_ids=ids, labels=ids).loss
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _adam_moments(model, batches):
    """Adam's exp_avg / exp_avg_sq after one step per batch at fixed weights (torch's update rule)."""
    m, v = {}, {}
    for ids in batches:
        for name, g in _grads(model, ids).items():
            m[name] = BETAS[0] * m.get(name, 0) + (1 - BETAS[0]) * g
            v[name] = BETAS[1] * v.get(name, 0) + (1 - BETAS[1]) * g * g
    return m, v


def _rel_err(got, want):
    assert got.keys() == want.keys()
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


@pytest.mark.parametrize("tie", [False, True])
def test_moments_of_a_decoalesced_model_map_onto_the_small_models(tie):
    """Small model S, large L = decoalesce(S) (width 2, GQA, float64). L computes S's function, so for every
    parameter the chain rule ties the gradients: g_S = coalesce_grad(g_L) (the adjoint of decoalescing),
    g_L = decoalesce_grad(g_S). Adam's moments over three batches, each built from its own model's
    autograd gradients, then map exactly: m like g, v through sqrt(v) (the paired entries of g_L are
    equal, so the EMA of g_S^2 is (r C(sqrt v_L))^2). Tolerance 1e-10 relative, float64 (errors are
    ~1e-15): a wrong scale r is off by a factor 2, a v mapped like the weights by up to 4."""
    large_config = make_config("gqa", tie=tie, layers=2)
    small_config = coalesced_config(large_config, 2, 1)
    small = random_model(small_config, seed=3).train()
    large = decoalesce(small, large_config).train()
    lmap = level_map(large_config, 2, 1)
    ids = [torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(k)) for k in range(3)]

    g_small, g_large = _grads(small, ids[0]), _grads(large, ids[0])
    assert _rel_err({n: coalesce_grad(n, g, lmap) for n, g in g_large.items()}, g_small) < 1e-10
    assert _rel_err({n: decoalesce_grad(n, g, lmap) for n, g in g_small.items()}, g_large) < 1e-10

    m_small, v_small = _adam_moments(small, ids)
    m_large, v_large = _adam_moments(large, ids)
    m, v = coalesce_moments(m_large, v_large, large_config, 2, 1)
    assert _rel_err(m, m_small) < 1e-10 and _rel_err(v, v_small) < 1e-10
    m, v = decoalesce_moments(m_small, v_small, small_config, large_config)
    assert _rel_err(m, m_large) < 1e-10 and _rel_err(v, v_large) < 1e-10


HAND = make_config("mha", hidden_size=2, num_attention_heads=2, num_key_value_heads=2, head_dim=1,
                   intermediate_size=2, layers=1, vocab_size=2)
NORM, HEAD, DOWN = "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight"


def test_gradient_scale_by_hand():
    """Width 2: the final norm has one output dimension (r = 2: a small unit carries both large outputs'
    gradient), down_proj an output and an input one (r = 2 / 2 = 1), the untied head one input (r = 1/2);
    a tied final norm also carries the 1/s^2 of the factor s = 2 that coalescing folds into it (r = 1/2)."""
    lmap = level_map(HAND, 2, 1)
    assert (gradient_scale(NORM, lmap), gradient_scale(DOWN, lmap), gradient_scale(HEAD, lmap)) == (2.0, 1.0, 0.5)
    tied = level_map(make_config("mha", tie=True, hidden_size=2, num_attention_heads=2, num_key_value_heads=2,
                                 head_dim=1, intermediate_size=2, layers=1, vocab_size=2), 2, 1)
    assert gradient_scale(NORM, tied) == 0.5 and gradient_scale("model.embed_tokens.weight", tied) == 2.0


def test_moments_coalesce_and_come_back_by_hand():
    """Hidden pair (0, 1), MLP pair (0, 1), width 2, one layer, untied.

    norm (r = 2): m = [0.1, 0.3] -> 2 * mean = 0.4; sqrt(v) = [0.1, 0.3] -> 0.4, v' = 0.16.
        Back: copy / r: m = [0.2, 0.2], sqrt(v) = [0.2, 0.2], v = [0.04, 0.04].
    lm_head (r = 1/2, columns are the hidden pair): m rows [0.2, 0.4], [-0.1, 0.1] -> sums / 2 = 0.3, 0;
        sqrt(v) rows [0.2, 0.4], [0.1, 0.1] -> 0.3, 0.1, v' = 0.09, 0.01. Back: copy, halve (input), / r:
        m rows [0.3, 0.3], [0, 0], v rows [0.09, 0.09], [0.01, 0.01]. (v mapped itself, r^2 * sum of v
        = 0.05 < m'^2 = 0.09, would give an update |m'| / sqrt(v') > 1, which no gradient sequence gives.)
    down_proj (r = 1): m = sqrt(v) = [[0.1, 0.2], [0.3, 0.4]] -> mean of row sums = (0.3 + 0.7) / 2 = 0.5,
        v' = 0.25. Back: copy, halve the input: 0.25 everywhere, v = 0.0625.
    """
    m = {NORM: torch.tensor([0.1, 0.3]), HEAD: torch.tensor([[0.2, 0.4], [-0.1, 0.1]]),
         DOWN: torch.tensor([[0.1, 0.2], [0.3, 0.4]])}
    v = {NORM: torch.tensor([0.01, 0.09]), HEAD: torch.tensor([[0.04, 0.16], [0.01, 0.01]]),
         DOWN: torch.tensor([[0.01, 0.04], [0.09, 0.16]])}
    m_small, v_small = coalesce_moments(m, v, HAND, 2, 1)
    expected = {NORM: ([0.4], [0.16]), HEAD: ([[0.3], [0.0]], [[0.09], [0.01]]), DOWN: ([[0.5]], [[0.25]])}
    for name, (m_want, v_want) in expected.items():
        torch.testing.assert_close(m_small[name], torch.tensor(m_want), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v_small[name], torch.tensor(v_want), rtol=1e-6, atol=1e-7)
    small_config = coalesced_config(HAND, 2, 1)
    m_back, v_back = decoalesce_moments(m_small, v_small, small_config, HAND)
    expected = {NORM: ([0.2, 0.2], [0.04, 0.04]), HEAD: ([[0.3, 0.3], [0.0, 0.0]], [[0.09, 0.09], [0.01, 0.01]]),
                DOWN: ([[0.25, 0.25], [0.25, 0.25]], [[0.0625, 0.0625], [0.0625, 0.0625]])}
    for name, (m_want, v_want) in expected.items():
        torch.testing.assert_close(m_back[name], torch.tensor(m_want), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v_back[name], torch.tensor(v_want), rtol=1e-6, atol=1e-7)

    # The round trip is the weights' round trip (decoalesce o coalesce: the average over each pair) applied
    # to m and to sqrt(v); on moments whose pairs are equal it is the identity, update m / sqrt(v) included.
    lmap = level_map(HAND, 2, 1)
    for name in m:
        def weights_round_trip(t):
            return decoalesce_param(name, coalesce_param(name, t, lmap), lmap)

        torch.testing.assert_close(m_back[name], weights_round_trip(m[name]), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v_back[name].sqrt(), weights_round_trip(v[name].sqrt()), rtol=1e-6, atol=1e-7)
    m_again, v_again = decoalesce_moments(*coalesce_moments(m_back, v_back, HAND, 2, 1), small_config, HAND)
    for name in m:
        torch.testing.assert_close(m_again[name], m_back[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m_again[name] / v_again[name].sqrt(), m_back[name] / v_back[name].sqrt(),
                                   rtol=1e-6, atol=1e-7)


def test_depth_and_width_round_trip_is_exact_from_the_small_side():
    """coalesce o decoalesce is the identity on any small moments (width and depth, both pairings; GQA heads pair by ``half``): the
    small level's moments survive a V-cycle's way down after its way up. And |m| <= sqrt(v), which Adam's
    EMAs satisfy, still holds after coalescing arbitrary (unpaired) large moments."""
    for pairing in ("half", {"hidden": "adjacent", "heads": "half", "mlp": "adjacent", "layers": "adjacent"}):
        large_config = make_config("gqa", layers=4)
        small_config = coalesced_config(large_config, 2, 2, pairing)
        g = torch.Generator().manual_seed(0)
        shapes = {n: p.shape for n, p in random_model(small_config).named_parameters()}
        v = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        m = {n: (2 * torch.rand(s, generator=g, dtype=torch.float64) - 1) * v[n].sqrt() for n, s in shapes.items()}
        m_up, v_up = decoalesce_moments(m, v, small_config, large_config, pairing)
        m_down, v_down = coalesce_moments(m_up, v_up, large_config, 2, 2, pairing)
        assert _rel_err(m_down, m) < 1e-12 and _rel_err(v_down, v) < 1e-12
        large_shapes = {n: p.shape for n, p in random_model(large_config).named_parameters()}
        v = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in large_shapes.items()}
        m = {n: (2 * torch.rand(s, generator=g, dtype=torch.float64) - 1) * v[n].sqrt() for n, s in large_shapes.items()}
        m_small, v_small = coalesce_moments(m, v, large_config, 2, 2, pairing)
        assert all((m_small[n].abs() <= v_small[n].sqrt() * (1 + 1e-12)).all() for n in m_small)
        assert all((v_small[n] >= 0).all() for n in v_small)
