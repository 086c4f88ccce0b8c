"""Config validation: one clear error per mistake, naming the field, before any work."""

import subprocess
import sys

import pytest

from conftest import REPO, tiny_overrides
from ds_accel.config import ConfigError, from_dict, load


def _error(tmp_path, **changes) -> str:
    data = tiny_overrides(tmp_path)
    for key, value in changes.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    return str(err.value)


def test_defaults_validate():
    """All defaults pass validation as declared; only the DeepSpeed config path may be made absolute."""
    from pathlib import Path

    from ds_accel.config import REPO_ROOT, TrainConfig

    cfg, declared = load(None).to_dict(), TrainConfig().to_dict()
    assert Path(cfg["deepspeed"].pop("config")).resolve() == (REPO_ROOT / declared["deepspeed"].pop("config")).resolve()
    assert cfg == declared


@pytest.mark.parametrize("change, field", [
    ({"run__total_stepz": 5}, "run.total_stepz"),
    ({"run__total_steps": "ten"}, "run.total_steps"),
    ({"run__total_steps": True}, "run.total_steps"),
    ({"run__total_steps": 0}, "run.total_steps"),
    ({"data__train_files": ["/no/such/file.txt"]}, "data.train_files"),
    ({"data__tokenizer": "/tmp"}, "data.tokenizer"),
    ({"sat__omission_rate": 1.5}, "sat.omission_rate"),
    ({"sat__schedule": "ladderr"}, "sat.schedule"),
    ({"multilevel__enabled": True, "multilevel__step_fractions": [0.5, 0.5]}, "multilevel.step_fractions"),
    ({"multilevel__enabled": True, "multilevel__lr_scale": [1.0]}, "multilevel.lr_scale"),
    ({"deepspeed__config": "ds_configs/zero9.json"}, "deepspeed.config"),
    ({"optim__warmup_steps": 100}, "optim.warmup_steps"),
    ({"optim__eps": 0.0}, "optim.eps"),
    ({"sat__tp_selection": "round-robin"}, "sat.tp_selection"),
    ({"multilevel__lr_schedule": "cosine"}, "multilevel.lr_schedule"),
])
def test_bad_field_is_named(tmp_path, change, field):
    assert _error(tmp_path, **change).startswith(field)


def test_float_field_accepts_int(tmp_path):
    data = tiny_overrides(tmp_path)
    data["optim"]["lr"] = 1
    assert from_dict(data).optim.lr == 1.0


def test_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string, in files and in ``--set optim.lr=1e-3``."""
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: 1e-3\n  eps: 1e-5\n")
    cfg = load(str(config), ["sat.omission_rate=25e-2"])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.sat.omission_rate) == (1e-3, 1e-5, 0.25)
    assert _error(tmp_path, optim__lr="fast").startswith("optim.lr: expected float, got 'fast'")


def test_cli_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ds_accel.cli", "train", "--set", "run.bogus=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ds-accel: error: run.bogus: unknown key")
    assert "Traceback" not in proc.stderr


def test_ds_config_conflict_is_named(tmp_path):
    import json

    from ds_accel.engine.build import resolve_ds_config

    ds = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = from_dict(tiny_overrides(tmp_path, deepspeed={"config": str(path)}))
    with pytest.raises(ConfigError, match="optim.micro_batch_size"):
        resolve_ds_config(cfg, 1)


def test_optimizer_offload_errors_are_named(tmp_path):
    """ZeRO-0 with offload_optimizer, and an explicit zero_force_ds_cpu_optimizer: true (DeepSpeedCPUAdam), are
    refused before any work; without the flag, offload runs torch's AdamW with the flag set to false."""
    import json

    from ds_accel.engine.build import resolve_ds_config

    ds = json.loads((REPO / "ds_configs" / "zero2_offload.json").read_text())
    ds["zero_optimization"]["stage"] = 0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = from_dict(tiny_overrides(tmp_path, deepspeed={"config": str(path)}))
    with pytest.raises(ConfigError, match=r"^deepspeed.config: zero_optimization.offload_optimizer needs ZeRO stage 1-3"):
        resolve_ds_config(cfg, 1)
    ds["zero_optimization"]["offload_optimizer"]["device"] = "none"  # DeepSpeed's way to switch it off
    path.write_text(json.dumps(ds))
    assert resolve_ds_config(cfg, 1)["zero_optimization"]["stage"] == 0
    ds["zero_optimization"] = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    ds["zero_force_ds_cpu_optimizer"] = True
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"^deepspeed.config: zero_force_ds_cpu_optimizer is true .* so remove "):
        resolve_ds_config(cfg, 1)
    del ds["zero_force_ds_cpu_optimizer"]
    path.write_text(json.dumps(ds))
    assert resolve_ds_config(cfg, 1)["zero_force_ds_cpu_optimizer"] is False
