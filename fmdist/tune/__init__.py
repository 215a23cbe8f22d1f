"""Hyperparameter search: Ray Tune over multi-worker DeepSpeed trials."""
