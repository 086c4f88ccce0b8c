"""ds_accel's methods in other training loops: SAT as a ``transformers.Trainer`` callback."""

from ds_accel.integrations.hf_trainer import SATCallback

__all__ = ["SATCallback"]
