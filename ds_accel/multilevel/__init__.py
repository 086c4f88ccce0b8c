"""Multi-level training (Zou et al., ICLR 2024): coalesce, decoalesce and interpolate HF Llama models."""

from ds_accel.multilevel.operators import (
    PAIRING_DIMENSIONS,
    PAIRINGS,
    LevelMap,
    Pairing,
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

__all__ = [
    "PAIRINGS",
    "PAIRING_DIMENSIONS",
    "LevelMap",
    "Pairing",
    "coalesce",
    "coalesce_param",
    "coalesce_state_dict",
    "coalesced_config",
    "decoalesce",
    "decoalesce_param",
    "decoalesce_state_dict",
    "interpolate",
    "interpolate_state_dict",
    "large_layer_source",
    "level_map",
    "small_layer_sources",
]
