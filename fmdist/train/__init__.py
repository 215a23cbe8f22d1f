"""Training: DeepSpeed config, the loop, checkpoints, the Ray Train launcher, export."""
