"""ds_accel: multi-level (V-cycle) training and Sparsity-Accelerated Training for Llama on DeepSpeed."""

__version__ = "0.1.0"
