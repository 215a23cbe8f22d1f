"""Data: resolving sources and reading them into Ray Data."""
