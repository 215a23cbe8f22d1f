"""Pieces several tasks share: building a model with a labelled head, processors, column checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fmdist.config import Config, ModelConfig
from fmdist.models.resolve import resolve_model_path
from fmdist.tasks import DataInfo

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(path: str) -> bool:
    """False for a directory holding only a model config and processor files (built from scratch)."""
    return not Path(path).is_dir() or any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def build_auto_model(auto_class: Any, model_cfg: ModelConfig) -> torch.nn.Module:
    """Pretrained weights with a fresh head for `label_names`, or a fresh model built from the config.

    A fresh model is built when `from_config` is set (its overrides apply to the config) or when the
    directory has no weights (a committed `configs/models/<name>/`). Call after seeding: every rank
    must build identical initial weights (ZeRO-3 partitions each rank's own copy, not rank 0's).
    """
    from transformers import AutoConfig

    path = resolve_model_path(model_cfg.name_or_path)
    names = model_cfg.label_names
    kwargs = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if model_cfg.from_config is not None or not has_weights(path):
        hf_config = AutoConfig.from_pretrained(path, **kwargs, **(model_cfg.from_config or {}))
        return auto_class.from_config(hf_config)
    # ignore_mismatched_sizes: a checkpoint's head for another label set is replaced, not an error.
    return auto_class.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if not tokenizer.is_fast:
        raise ValueError(f"model.name_or_path {path!r} has no fast tokenizer; fmdist needs one (for word alignment).")
    return tokenizer


def is_string(arrow_type: str) -> bool:
    return arrow_type in ("string", "large_string")


def is_integer(arrow_type: str) -> bool:
    return arrow_type.startswith(("int", "uint"))


def missing_columns(cfg: Config, info: DataInfo) -> list[str]:
    missing = [c for c in (cfg.data.text_column, cfg.data.label_column) if c not in info.columns]
    if not missing:
        return []
    return [
        f"{info.field}: {info.uri!r} has no column(s) {missing}; it has {list(info.columns)}. "
        f"Set data.text_column / data.label_column to match (model.task {cfg.model.task} defaults to "
        f"{cfg.data.text_column!r} / {cfg.data.label_column!r} only when they are unset)."
    ]


def check_class_labels(cfg: Config, source: Any, field: str) -> None:
    from fmdist.data.sources import check_labels

    check_labels(source, cfg.data.label_column, cfg.model.num_labels, field)
