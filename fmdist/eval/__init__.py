"""Evaluation: metrics from gathered counts, reports people can read."""
