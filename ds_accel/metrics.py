"""Run metrics: DeepSpeed's monitor (TensorBoard / CSV per its config), a JSONL log, and the
loss-curve PNG a person looks at after a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Rows of metrics kept in memory (they travel in checkpoints, so a resumed run plots whole)
    and appended to ``metrics.jsonl``; scalars also go to the engine's monitor."""

    def __init__(self, out_dir: Path, history: list[dict[str, Any]] | None = None, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = list(history or [])
        self.enabled = enabled
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict[str, Any], monitor=None) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if monitor is not None and getattr(monitor, "enabled", False):
            step = row["step"]
            monitor.write_events([(f"Train/{k}", float(v), step) for k, v in row.items()
                                  if k != "step" and isinstance(v, (int, float))])


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training and validation loss against step, V-cycle transitions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    for r in rows:
        if "transition" in r:
            ax.axvline(r["step"], color="grey", ls=":", lw=1)
            ax.text(r["step"], ax.get_ylim()[1], f" L{r['level']}", va="top", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
