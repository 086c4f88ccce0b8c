"""Single-process training: learning, exact resume, HF export."""

import json

import pytest
import torch

from ds_accel.trainer import train


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_dense_training_lowers_validation_loss(tiny_cfg):
    cfg = tiny_cfg(run={"total_steps": 24, "eval_every": 6})
    train(cfg)
    vals = [r["val_loss"] for r in _rows(cfg.run.output_dir and __import__("pathlib").Path(cfg.run.output_dir))
            if "val_loss" in r]
    assert len(vals) == 4 and vals[-1] < vals[0] - 0.5
    assert (__import__("pathlib").Path(cfg.run.output_dir) / "loss.png").stat().st_size > 1000


def test_stop_and_resume_gives_the_same_losses(tmp_path, tiny_cfg):
    from ds_accel.config import from_dict
    from conftest import tiny_overrides

    straight = from_dict(tiny_overrides(tmp_path / "straight"))
    train(straight)
    stopped = from_dict(tiny_overrides(tmp_path / "stopped"))
    assert train(stopped, stop_after=3) == {"stopped_at": 3}
    train(stopped, resume=True)
    a = [(r["step"], r["loss"], r.get("val_loss")) for r in _rows(tmp_path / "straight") if "loss" in r]
    b = [(r["step"], r["loss"], r.get("val_loss")) for r in _rows(tmp_path / "stopped") if "loss" in r]
    assert [s for s, *_ in b] == list(range(1, 9))
    for (sa, la, va), (sb, lb, vb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-6, abs=1e-6)
        assert (va is None) == (vb is None) and (va is None or va == pytest.approx(vb, rel=1e-6))


def test_export_loads_and_matches_the_trained_model(tiny_cfg):
    from pathlib import Path

    from ds_accel.data import prepare
    from ds_accel.engine.export import load_exported

    cfg = tiny_cfg(run={"export": True, "eval_every": 8})
    result = train(cfg)
    model = load_exported(result["export_dir"]).eval()
    corpus = prepare(cfg.data)
    x = corpus.val[: cfg.optim.micro_batch_size * cfg.run.eval_batches]
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in x.split(cfg.optim.micro_batch_size)]
    assert sum(losses) / len(losses) == pytest.approx(result["val_loss"], rel=1e-5)
    out = model.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    assert (Path(result["export_dir"]) / "tokenizer_config.json").is_file()


def test_lr_schedule_restarts_per_stage_or_runs_once(tiny_cfg):
    """multilevel.lr_schedule: "stage" warms up in the first stage only and starts every later stage at
    its level's peak, cosine to min_lr_ratio within the stage; "run" is one warm-up + cosine."""
    from dataclasses import replace
    from math import cos, pi

    from ds_accel.models import llama_config
    from ds_accel.multilevel.vcycle import plan
    from ds_accel.trainer import lr_at

    ml = {"enabled": True, "step_fractions": [0.25, 0.375, 0.375], "lr_scale": [1.0, 4.0], "lr_schedule": "stage"}
    cfg = tiny_cfg(multilevel=ml, run={"total_steps": 16}, optim={"lr": 1e-3, "warmup_steps": 2, "min_lr_ratio": 0.1})
    stages = plan(llama_config("tiny", 512), cfg.multilevel, 16)
    assert [(s.start, s.end) for s in stages] == [(0, 4), (4, 10), (10, 16)]

    def stage_of(step):
        return next(s for s in stages if s.start <= step < s.end)

    lrs = [lr_at(cfg, t, stage_of(t)) for t in range(16)]
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(4e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(4e-3 * (0.1 + 0.45 * (1 + cos(pi * 5 / 6))))
    assert lrs[15] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + cos(pi * 5 / 6))))
    once = replace(cfg, multilevel=replace(cfg.multilevel, lr_schedule="run"))
    assert lr_at(once, 4, stage_of(4)) == pytest.approx(4e-3 * (0.1 + 0.45 * (1 + cos(pi * 2 / 14))))
    assert lr_at(once, 10, stage_of(10)) == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + cos(pi * 8 / 14))))


def test_zero3_with_tensor_parallelism_is_refused_before_any_work(tmp_path):
    import json as _json

    from conftest import REPO, tiny_overrides
    from ds_accel.config import ConfigError, from_dict

    ds = _json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["tensor_parallel"] = {"autotp_size": 2}
    path = tmp_path / "zero3_tp2.json"
    path.write_text(_json.dumps(ds))
    cfg = from_dict(tiny_overrides(tmp_path / "run", deepspeed={"config": str(path)}))
    with pytest.raises(ConfigError, match=r"^deepspeed\.config: ZeRO-3 together with tensor parallelism "
                                          r"\(autotp_size 2\) is not supported.*ds_configs/tp2\.json"):
        train(cfg)
    assert not (tmp_path / "run").exists(), "the layout error came after work had started"


def test_moment_transfer_under_zero0_bf16_is_refused_before_any_work(tmp_path):
    """DeepSpeed's ZeRO-0 bf16 optimizer hides Adam's state from the transfer; that must stop the run before
    the data or an engine is built, not at the first transition."""
    from conftest import REPO, tiny_overrides
    from ds_accel.config import ConfigError, from_dict

    cfg = from_dict(tiny_overrides(tmp_path / "run", model={"dtype": "bf16"},
                                   deepspeed={"config": str(REPO / "ds_configs" / "zero0.json")},
                                   multilevel={"enabled": True, "optimizer_policy": "transfer"}))
    with pytest.raises(ConfigError, match=r"^multilevel\.optimizer_policy: transfer .* ZeRO-0 with bf16"):
        train(cfg)
    assert not (tmp_path / "run").exists(), "the error came after work had started"
