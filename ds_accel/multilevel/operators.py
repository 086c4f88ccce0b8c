"""Multi-level operators for HF Llama: coalesce, decoalesce, interpolate (Zou et al., ICLR 2024).

Pure functions over tensors, state dicts and models; no DeepSpeed. The engine wrapper calls the
per-parameter forms (`coalesce_param`, `decoalesce_param`, `small_layer_sources`,
`large_layer_source`) one tensor or one layer at a time; the state-dict and model forms are built
from them.

A *pairing* groups the n units of a dimension into n/f groups of f units (f = the factor):
`half` puts unit i with i + n/f, i + 2n/f, ... (the authors' GPT-2 config); `adjacent` puts f*i ..
f*i + f - 1 together (the paper's depth template). A unit is one neuron for hidden and MLP, one
whole head of `head_dim` neurons for query and key/value heads, one decoder layer for depth.

With F the averaging matrix of a dimension (1/f on each group), S = f*F the summing one and
T = f*F^T the copy matrix, a linear weight W (out x in) maps as
    coalesce:   W' = F_out W S_in^T           decoalesce:   W = T_out W' T_in^T / f
so that a large model whose grouped units are equal computes the small model's function.
Everything is done with index operations, never with dense n x n matrices.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

Pairing = str | Mapping[str, str]
StateDict = dict[str, Tensor]

PAIRINGS = ("half", "adjacent")
PAIRING_DIMENSIONS = ("hidden", "heads", "mlp", "layers")

# Width role of each tensor dimension, by the last two components of the parameter name:
# (axis, is_input) -- outputs are averaged (F) / copied (T), inputs summed (S) / split (T/f).
_OUT_HIDDEN = ("hidden", False)
_WIDTH_RULES: dict[str, tuple[tuple[str, bool] | None, ...]] = {
    "q_proj.weight": (("q_heads", False), ("hidden", True)),
    "k_proj.weight": (("kv_heads", False), ("hidden", True)),
    "v_proj.weight": (("kv_heads", False), ("hidden", True)),
    "o_proj.weight": (_OUT_HIDDEN, ("q_heads", True)),
    "gate_proj.weight": (("mlp", False), ("hidden", True)),
    "up_proj.weight": (("mlp", False), ("hidden", True)),
    "down_proj.weight": (_OUT_HIDDEN, ("mlp", True)),
    "input_layernorm.weight": (_OUT_HIDDEN,),
    "post_attention_layernorm.weight": (_OUT_HIDDEN,),
    "norm.weight": (_OUT_HIDDEN,),
    "embed_tokens.weight": (None, _OUT_HIDDEN),
    "lm_head.weight": (None, ("hidden", True)),
}
# Biases are averaged like the outputs of their weight.
_WIDTH_RULES.update(
    {k.replace(".weight", ".bias"): v[:1] for k, v in _WIDTH_RULES.items() if k.endswith("proj.weight")}
)
_LAYER = re.compile(r"(?<![^.])layers\.(\d+)\.")


@dataclass(frozen=True)
class LevelMap:
    """Index groups between a large level and the next smaller one.

    `groups[axis]` is a LongTensor (n_small x factor): row i lists the large units merged into small
    unit i, for axes "hidden", "q_heads", "kv_heads", "mlp" (width factor) and "layers" (depth).
    """

    large_config: LlamaConfig
    small_config: LlamaConfig
    width_factor: int
    depth_factor: int
    groups: Mapping[str, Tensor]

    def unit(self, axis: str) -> int:
        """Neurons per unit along `axis`: a whole head for the head axes, else one."""
        return _head_dim(self.large_config) if axis.endswith("heads") else 1


def _head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _pairings(pairing: Pairing) -> dict[str, str]:
    """Normalise `pairing` to one name per dimension (missing dimensions default to `half`)."""
    given = {dim: pairing for dim in PAIRING_DIMENSIONS} if isinstance(pairing, str) else dict(pairing)
    unknown = set(given) - set(PAIRING_DIMENSIONS)
    if unknown:
        raise ValueError(f"pairing has unknown dimension(s) {sorted(unknown)}; use keys among {PAIRING_DIMENSIONS}")
    for dim, name in given.items():
        if name not in PAIRINGS:
            raise ValueError(f"pairing[{dim!r}]={name!r} is not a known pairing; use one of {PAIRINGS}")
    return {dim: given.get(dim, "half") for dim in PAIRING_DIMENSIONS}


def _groups(n: int, factor: int, name: str) -> Tensor:
    """(n/factor x factor) unit indices: `half` row i = i, i + n/f, ...; `adjacent` row i = f*i .. f*i+f-1."""
    units = torch.arange(n)
    return units.view(factor, n // factor).T.contiguous() if name == "half" else units.view(n // factor, factor)


def _owner(groups: Tensor) -> Tensor:
    """Inverse of `groups`: for each large unit, the small unit it is merged into."""
    n_small, factor = groups.shape
    owner = torch.empty(n_small * factor, dtype=torch.long)
    owner[groups.flatten()] = torch.arange(n_small).repeat_interleave(factor)
    return owner


def _check_divisible(field: str, value: int, factor: int, factor_name: str, fix: str) -> None:
    if value % factor:
        raise ValueError(f"{field}={value} is not divisible by {factor_name}={factor}; {fix}")


def _check_gqa(q_groups: Tensor, kv_groups: Tensor, group_size: int) -> None:
    """Each small query head must merge large query heads whose KV heads are exactly the members of the
    small KV head it attends to; otherwise the merged attention is not the large one."""
    q_kv = (q_groups // group_size).sort(dim=1).values
    expected = kv_groups[torch.arange(len(q_groups)) // group_size].sort(dim=1).values
    if not torch.equal(q_kv, expected):
        raise ValueError(
            "num_key_value_heads: the heads pairing merges query heads from KV groups that are not merged "
            f"together (GQA group size {group_size}); use pairing 'half' for 'heads'"
        )


def coalesced_config(
    config: LlamaConfig, width_factor: int = 2, depth_factor: int = 2, pairing: Pairing = "half"
) -> LlamaConfig:
    """Config of the coalesced level: d/f, H/f, K/f, m/f (head size, RoPE, vocab unchanged), L/depth_factor.

    Validates before anything changes: every width dimension divisible by `width_factor` (whole heads
    merge, so H and K too), layers by `depth_factor`, and with GQA a heads pairing that keeps merged
    query heads inside their merged KV group.
    """
    for factor_name, factor in (("width_factor", width_factor), ("depth_factor", depth_factor)):
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"{factor_name} must be a positive integer, got {factor!r}")
    names = _pairings(pairing)
    f = width_factor
    _check_divisible("hidden_size", config.hidden_size, f, "width_factor", "choose a width_factor that divides it")
    _check_divisible(
        "num_attention_heads", config.num_attention_heads, f, "width_factor",
        "whole heads are merged; choose a width_factor that divides the head count",
    )
    _check_divisible(
        "num_key_value_heads", config.num_key_value_heads, f, "width_factor",
        "whole KV heads are merged; choose a width_factor that divides the KV head count",
    )
    _check_divisible(
        "intermediate_size", config.intermediate_size, f, "width_factor", "choose a width_factor that divides it"
    )
    _check_divisible(
        "num_hidden_layers", config.num_hidden_layers, depth_factor, "depth_factor",
        "choose a depth_factor that divides the layer count",
    )
    H, K = config.num_attention_heads, config.num_key_value_heads
    _check_gqa(_groups(H, f, names["heads"]), _groups(K, f, names["heads"]), H // K)
    small = copy.deepcopy(config)
    small.hidden_size = config.hidden_size // f
    small.num_attention_heads = H // f
    small.num_key_value_heads = K // f
    small.intermediate_size = config.intermediate_size // f
    small.num_hidden_layers = config.num_hidden_layers // depth_factor
    small.head_dim = _head_dim(config)
    return small


def level_map(
    large_config: LlamaConfig, width_factor: int = 2, depth_factor: int = 2, pairing: Pairing = "half"
) -> LevelMap:
    """Validate the shapes and build the index groups of every dimension for one level transition."""
    small_config = coalesced_config(large_config, width_factor, depth_factor, pairing)
    names = _pairings(pairing)
    sizes = {
        "hidden": (large_config.hidden_size, width_factor, names["hidden"]),
        "q_heads": (large_config.num_attention_heads, width_factor, names["heads"]),
        "kv_heads": (large_config.num_key_value_heads, width_factor, names["heads"]),
        "mlp": (large_config.intermediate_size, width_factor, names["mlp"]),
        "layers": (large_config.num_hidden_layers, depth_factor, names["layers"]),
    }
    groups = {axis: _groups(*size) for axis, size in sizes.items()}
    return LevelMap(large_config, small_config, width_factor, depth_factor, groups)


def _rule(name: str, lmap: LevelMap) -> tuple[list[tuple[int, str, bool]], float]:
    """(dim, axis, is_input) for each width-mapped dimension of ``name``, and the factor a tied final
    norm gains when coalesced (see ``coalesce``)."""
    key = ".".join(name.split(".")[-2:])
    if key not in _WIDTH_RULES:
        raise ValueError(f"no multi-level rule for parameter {name!r}; expected a HF Llama parameter name")
    tied = lmap.large_config.tie_word_embeddings
    rule = _WIDTH_RULES["embed_tokens.weight" if key == "lm_head.weight" and tied else key]
    roles = [(dim, *role) for dim, role in enumerate(rule) if role is not None]
    return roles, float(lmap.width_factor) if key == "norm.weight" and tied else 1.0


def _width_roles(name: str, tensor: Tensor, lmap: LevelMap, large: bool) -> tuple[list[tuple[int, str, bool]], float]:
    """``_rule`` after checking the sizes, so a sharded tensor fails loudly."""
    roles, scale = _rule(name, lmap)
    for dim, axis, _ in roles:
        n_small, factor = lmap.groups[axis].shape
        expected = (n_small * factor if large else n_small) * lmap.unit(axis)
        if tensor.shape[dim] != expected:
            raise ValueError(
                f"{name}: dim {dim} has size {tensor.shape[dim]}, expected {expected} for the "
                f"{'large' if large else 'small'} model; pass whole (gathered, unsharded) parameters"
            )
    return roles, scale


def coalesce_param(name: str, tensor: Tensor, lmap: LevelMap) -> Tensor:
    """Width-coalesce one parameter: W' = F_out W S_in^T (norms F g, embeddings E F^T, untied head W S^T).

    The layer index in `name` plays no role; depth is `small_layer_sources`. Keeps dtype and device.
    """
    roles, scale = _width_roles(name, tensor, lmap, large=True)
    for dim, axis, is_input in roles:
        groups = lmap.groups[axis].to(tensor.device)
        units = tensor.unflatten(dim, (-1, lmap.unit(axis))).index_select(dim, groups.flatten())
        units = units.unflatten(dim, tuple(groups.shape))
        units = units.sum(dim + 1) if is_input else units.mean(dim + 1)
        tensor = units.flatten(dim, dim + 1)
    return tensor * scale if scale != 1.0 else tensor


def decoalesce_param(name: str, tensor: Tensor, lmap: LevelMap) -> Tensor:
    """Width-decoalesce one parameter: W = T_out W' T_in^T / f (tied final norm: T g' / f).

    Every small unit is copied to each large unit of its group; an input dimension also splits its
    weight f ways (T_in^T T_in = f I), so the large model reproduces the small one's outputs.
    """
    roles, coalesce_scale = _width_roles(name, tensor, lmap, large=False)
    scale = 1.0 / coalesce_scale
    for dim, axis, is_input in roles:
        owner = _owner(lmap.groups[axis]).to(tensor.device)
        tensor = tensor.unflatten(dim, (-1, lmap.unit(axis))).index_select(dim, owner).flatten(dim, dim + 1)
        if is_input:
            scale /= lmap.width_factor
    return tensor * scale if scale != 1.0 else tensor


def gradient_scale(name: str, lmap: LevelMap) -> float:
    """r with coalesce_grad = r * coalesce_param: f per width-mapped output dimension, 1/f per input
    dimension, and 1/s^2 for a tied final norm (s = f, the factor ``coalesce`` folds into it).

    Width decoalescing D preserves the function (L'(W') = L(D(W'))), so the small model's gradient is
    the adjoint of D applied to the large one's, g' = D^T g = S_out g F_in^T / s: outputs summed,
    inputs averaged, where coalescing the weight averages outputs and sums inputs (W' = s F_out W S_in^T).
    """
    roles, s = _rule(name, lmap)
    f = float(lmap.width_factor)
    r = 1.0 / (s * s)
    for _, _, is_input in roles:
        r *= 1.0 / f if is_input else f
    return r


def coalesce_grad(name: str, tensor: Tensor, lmap: LevelMap) -> Tensor:
    """A gradient (or Adam's first moment, or the root of its second) of the large model mapped to the
    small one: g' = r F_out g S_in^T, r from ``gradient_scale``; exact when the large model is a
    decoalesced small one (paired units equal), whatever the loss."""
    return coalesce_param(name, tensor, lmap) * gradient_scale(name, lmap)


def decoalesce_grad(name: str, tensor: Tensor, lmap: LevelMap) -> Tensor:
    """The inverse direction: g = T_out g' T_in^T / (f^#in r), the gradient that a decoalesced model
    has where the small one has g' (each large unit of a pair gets its share)."""
    return decoalesce_param(name, tensor, lmap) / gradient_scale(name, lmap)


def small_layer_sources(lmap: LevelMap) -> list[tuple[int, ...]]:
    """Depth coalescing R: small layer i is the average of the large layers listed at position i."""
    return [tuple(row) for row in lmap.groups["layers"].tolist()]


def large_layer_source(lmap: LevelMap, j: int) -> int:
    """Depth decoalescing G = row-normalised R^T: large layer j is a copy of this small layer."""
    return int(_owner(lmap.groups["layers"])[j])


def _layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _with_layer(name: str, index: int) -> str:
    return _LAYER.sub(f"layers.{index}.", name, count=1)


def coalesce_state_dict(
    sd: Mapping[str, Tensor],
    large_config: LlamaConfig,
    width_factor: int = 2,
    depth_factor: int = 2,
    pairing: Pairing = "half",
) -> tuple[StateDict, LlamaConfig]:
    """Coalesce a whole state dict: width per parameter, then depth (small layer = mean of its group)."""
    lmap = level_map(large_config, width_factor, depth_factor, pairing)
    sources = small_layer_sources(lmap)
    first = {group[0]: i for i, group in enumerate(sources)}
    small: StateDict = {}
    for name, tensor in sd.items():
        j = _layer_index(name)
        if j is None:
            small[name] = coalesce_param(name, tensor, lmap)
        elif j in first:
            i = first[j]
            members = [coalesce_param(_with_layer(name, a), sd[_with_layer(name, a)], lmap) for a in sources[i]]
            small[_with_layer(name, i)] = torch.stack(members).mean(0)
    return small, lmap.small_config


def _decoalesce_map(small_config: LlamaConfig, large_config: LlamaConfig, pairing: Pairing) -> LevelMap:
    """Level map between two given configs; raises if `small_config` is not a coalescing of `large_config`."""
    width = large_config.hidden_size // small_config.hidden_size
    depth = large_config.num_hidden_layers // small_config.num_hidden_layers
    lmap = level_map(large_config, width, depth, pairing)
    fields = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "num_hidden_layers", "head_dim", "vocab_size", "tie_word_embeddings")
    for field in fields:
        want, got = getattr(lmap.small_config, field), getattr(small_config, field)
        if want != got:
            raise ValueError(
                f"{field}={got} of the small config does not match the large config coalesced by "
                f"width {width}, depth {depth} ({field}={want}); pass the config the small model was coalesced to"
            )
    return lmap


def decoalesce_state_dict(
    small_sd: Mapping[str, Tensor], small_config: LlamaConfig, large_config: LlamaConfig, pairing: Pairing = "half"
) -> StateDict:
    """Decoalesce a whole state dict: each large layer j is the width-decoalesced copy of its small layer."""
    lmap = _decoalesce_map(small_config, large_config, pairing)
    large: StateDict = {}
    for name, tensor in small_sd.items():
        if _layer_index(name) is None:
            large[name] = decoalesce_param(name, tensor, lmap)
    for j in range(large_config.num_hidden_layers):
        i = large_layer_source(lmap, j)
        for name, tensor in small_sd.items():
            if _layer_index(name) == i:
                large[_with_layer(name, j)] = decoalesce_param(name, tensor, lmap)
    return large


def interpolate_state_dict(
    large_sd: Mapping[str, Tensor], decoalesced_sd: Mapping[str, Tensor], alpha: float
) -> StateDict:
    """theta = (1 - alpha) theta_L + alpha decoalesce(theta_S), per parameter: breaks the symmetry of the
    copies that decoalescing makes, so grouped units can diverge again."""
    if large_sd.keys() != decoalesced_sd.keys():
        raise ValueError(
            f"interpolate: state dict keys differ ({sorted(large_sd.keys() ^ decoalesced_sd.keys())[:4]}...); "
            "both must belong to the same large config"
        )
    return {name: (1 - alpha) * large_sd[name] + alpha * decoalesced_sd[name] for name in large_sd}


def coalesce_moments(
    exp_avg: Mapping[str, Tensor],
    exp_avg_sq: Mapping[str, Tensor],
    large_config: LlamaConfig,
    width_factor: int = 2,
    depth_factor: int = 2,
    pairing: Pairing = "half",
) -> tuple[StateDict, StateDict]:
    """Adam's moments of the large model mapped to the small one, as gradients map (``coalesce_grad``).

    m maps like g (an EMA is linear). For the second moment, sqrt(v) maps like |g| and is squared:
    v' = (r C(sqrt v))^2 >= 0. When paired units' gradients are equal (a decoalesced model) this is
    exactly the EMA of g'^2; otherwise it is the smallest bound on E[g'^2] that holds for any correlation
    between the pair (Minkowski), and it keeps |m'| <= sqrt(v') wherever |m| <= sqrt(v). Depth (no
    exact gradient relation: depth coalescing does not preserve the function) averages paired layers'
    m and sqrt(v), keeping a layer's gradient scale.
    """
    m, _ = coalesce_state_dict(exp_avg, large_config, width_factor, depth_factor, pairing)
    rms, _ = coalesce_state_dict({n: v.sqrt() for n, v in exp_avg_sq.items()}, large_config, width_factor,
                                 depth_factor, pairing)
    lmap = level_map(large_config, width_factor, depth_factor, pairing)
    return ({n: t * gradient_scale(n, lmap) for n, t in m.items()},
            {n: (t * gradient_scale(n, lmap)).square() for n, t in rms.items()})


def decoalesce_moments(
    exp_avg: Mapping[str, Tensor],
    exp_avg_sq: Mapping[str, Tensor],
    small_config: LlamaConfig,
    large_config: LlamaConfig,
    pairing: Pairing = "half",
) -> tuple[StateDict, StateDict]:
    """Adam's moments of the small model mapped to the large one (``decoalesce_grad`` on m and sqrt(v)):
    the moments a decoalesced model would have built from the gradients the small one saw."""
    lmap = _decoalesce_map(small_config, large_config, pairing)
    m = decoalesce_state_dict(exp_avg, small_config, large_config, pairing)
    rms = decoalesce_state_dict({n: v.sqrt() for n, v in exp_avg_sq.items()}, small_config, large_config, pairing)
    return ({n: t / gradient_scale(n, lmap) for n, t in m.items()},
            {n: (t / gradient_scale(n, lmap)).square() for n, t in rms.items()})


def _build(config: LlamaConfig, sd: StateDict, like: LlamaForCausalLM) -> LlamaForCausalLM:
    """New model of `config` with `sd` loaded strictly, on the device, dtype and mode of `like`."""
    param = next(like.parameters())
    if config.tie_word_embeddings:
        sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    model = LlamaForCausalLM(config).to(device=param.device, dtype=param.dtype)
    model.load_state_dict(sd, strict=True)
    return model.train(like.training)


def coalesce(
    model: LlamaForCausalLM, width_factor: int = 2, depth_factor: int = 2, pairing: Pairing = "half"
) -> LlamaForCausalLM:
    """Coalesced copy of `model` (the input is untouched): width W' = F_out W S_in^T, then depth average.

    Tied embeddings (a deliberate deviation from the spec, which sums the shared matrix): the shared
    matrix is averaged, E' = E F_d^T (right for the input side), and the missing factor f of the
    output side is folded into the final norm, g' = f F_d g. When grouped units are equal (E = E' T^T,
    final hidden n = T n'), the logits E (g * n) = f E' (F_d g * n') = E' (g' * n') are then preserved
    too. Untied models follow the spec exactly (final norm averaged, lm_head summed).
    """
    small_sd, small_config = coalesce_state_dict(model.state_dict(), model.config, width_factor, depth_factor, pairing)
    return _build(small_config, small_sd, like=model)


def decoalesce(small: LlamaForCausalLM, large_config: LlamaConfig, pairing: Pairing = "half") -> LlamaForCausalLM:
    """Decoalesced copy of `small` with `large_config` (width W = T_out W' T_in^T / f, depth copies).

    Tied embeddings: E = E' T^T (copied) and the final norm g = T g' / f, the inverse of `coalesce`'s
    rule; width decoalescing then computes the small model's logits exactly, tied or not.
    """
    large_sd = decoalesce_state_dict(small.state_dict(), small.config, large_config, pairing)
    return _build(large_config, large_sd, like=small)


def interpolate(large: LlamaForCausalLM, decoalesced: LlamaForCausalLM, alpha: float) -> LlamaForCausalLM:
    """New model theta = (1 - alpha) theta_large + alpha theta_decoalesced; the inputs are untouched."""
    sd = interpolate_state_dict(large.state_dict(), decoalesced.state_dict(), alpha)
    return _build(large.config, sd, like=large)
