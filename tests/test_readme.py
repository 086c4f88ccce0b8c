"""The README's config reference lists every config field with its real default (it is the users' manual)."""

import dataclasses
import json
import re

from conftest import REPO
from ds_accel.config import TrainConfig


def test_every_config_field_has_a_readme_row_with_its_default():
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `([^`]*)` \|", (REPO / "README.md").read_text(), re.M))
    cfg = TrainConfig()
    missing, wrong = [], []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key, default = f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name)
            if key not in rows:
                missing.append(key)
            elif (float(rows[key]) != default if isinstance(default, float) else
                  rows[key] != (json.dumps(default) if isinstance(default, str) else str(default))):
                wrong.append(f"{key}: README {rows[key]}, config {default!r}")
    assert not missing, f"config fields without a README row: {missing}"
    assert not wrong, f"README defaults that differ from config.py: {wrong}"
