"""2 real gloo ranks under ZeRO-1 and ZeRO-3 reproduce the single-process run step by step."""

import json
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from ranks import run_ranks


def _train(cfg_dict):
    from ds_accel.config import from_dict
    from ds_accel.trainer import train

    train(from_dict(cfg_dict))
    rows = Path(cfg_dict["run"]["output_dir"], "metrics.jsonl")
    return [json.loads(x) for x in rows.read_text().splitlines()] if rows.exists() else None


def _losses(rows):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    cfg = tiny_overrides(tmp_path_factory.mktemp("single"), optim={"micro_batch_size": 8})
    return _losses(run_ranks(_train, 1, cfg)[0])


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 3])
def test_two_ranks_match_one_process(tmp_path, single_process, stage):
    cfg = tiny_overrides(tmp_path, optim={"micro_batch_size": 4},
                         deepspeed={"config": str(REPO / "ds_configs" / f"zero{stage}.json")})
    rows = run_ranks(_train, 2, cfg)[0]
    two = _losses(rows)
    assert len(two) == len(single_process) == 8
    for (s1, l1, v1), (s2, l2, v2) in zip(single_process, two):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=2e-5)
        assert (v1 is None) == (v2 is None) and (v1 is None or v2 == pytest.approx(v1, rel=2e-5))
