"""fmdist: fine-tune foundation models on a Ray cluster with DeepSpeed ZeRO."""

__version__ = "0.1.0"
