"""The CPT scenario's base model: pretrained once on the KJV, cached by the hash of its config.

SAT's premise is the activation structure of a *pretrained* model, so continual pretraining starts
from a base trained to convergence on its own corpus (``configs/bench_cpt_base.yaml``: 20 tokens per
parameter). That takes the better part of an hour on 2 CPU cores, so the trained base is kept under
``$DS_ACCEL_CACHE/bench_bases/<hash>/`` (``export/``: the HF model and its tokenizer; ``metrics.jsonl``
and ``loss.png``: its curve) and reused by every later benchmark with the same config. An interrupted
pretraining resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..checkpoint import latest
from ..data import CACHE_DIR
from .runs import merge, train_child

BASES = CACHE_DIR / "bench_bases"
# where outputs go and how often to checkpoint: not part of what the base is
PLUMBING = {"run": ("output_dir", "progress", "export", "save_every", "keep_checkpoints")}


def config_hash(cfg: dict) -> str:
    """16 hex digits of SHA-256 over ``cfg`` as canonical JSON (sorted keys), the plumbing fields left out.

    The hash is over the config as written, not over the resolved dataclasses: a field added to
    ``TrainConfig`` later does not orphan the cached base. The base config therefore writes out every
    field that shapes the weights.
    """
    kept = {section: {k: v for k, v in values.items() if k not in PLUMBING.get(section, ())}
            if isinstance(values, dict) else values for section, values in cfg.items()}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(cfg: dict, root: Path = BASES) -> Path:
    """The run directory of the base trained by ``cfg``: from the cache, or trained now (resumed if a
    checkpoint of an interrupted pretraining is there). ``export/`` holds the model and tokenizer."""
    run_dir = root / config_hash(cfg)
    if not (run_dir / "result.json").is_file():
        print(f"\n== base model: pretraining into {run_dir} ==", flush=True)
        resume = latest(run_dir / "checkpoints") is not None
        train_child(merge(cfg, {"run": {"output_dir": str(run_dir), "export": True}}), run_dir, resume)
    return run_dir
