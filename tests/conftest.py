"""Shared fixtures: tiny runs on the bundled corpus, one CPU thread per rank, no JIT-built ops."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]


def train_rows(cfg_dict: dict, stop_after: int | None = None, resume: bool = False) -> list[dict] | None:
    """Run (or resume) the trainer on this rank (a ``run_ranks`` target); returns metrics.jsonl's rows."""
    import json

    from ds_accel.config import from_dict
    from ds_accel.trainer import train

    train(from_dict(cfg_dict), resume=resume, stop_after=stop_after)
    path = Path(cfg_dict["run"]["output_dir"], "metrics.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else None


def tiny_overrides(out_dir: Path, **extra) -> dict:
    """A run config dict for a seconds-long run of the tiny preset on a slice of the KJV."""
    cfg = {
        "run": {"output_dir": str(out_dir), "total_steps": 8, "eval_every": 4, "eval_batches": 2,
                "log_every": 1, "progress": False, "export": False},
        "data": {"seq_len": 32, "max_chars": 120_000, "vocab_size": 512},
        "model": {"preset": "tiny"},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "micro_batch_size": 4},
        "deepspeed": {"config": str(REPO / "ds_configs" / "zero0.json")},
    }
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    from ds_accel.config import from_dict

    def make(**extra):
        return from_dict(tiny_overrides(tmp_path / "run", **extra))

    return make
