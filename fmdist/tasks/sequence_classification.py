"""Sequence classification: build the model, turn rows into padded tensors, count predictions."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from fmdist.config import DataConfig, ModelConfig
from fmdist.models.resolve import resolve_model_path


def label_maps(model_cfg: ModelConfig) -> tuple[dict[int, str], dict[str, int]]:
    names = model_cfg.label_names or [f"LABEL_{i}" for i in range(model_cfg.num_labels)]
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def build_model(model_cfg: ModelConfig) -> torch.nn.Module:
    """Pretrained weights with a fresh classification head, or a fresh model when `from_config` is set.

    Call after seeding: every rank must build identical initial weights (ZeRO-3 partitions each
    rank's own copy rather than broadcasting rank 0's).
    """
    path = resolve_model_path(model_cfg.name_or_path)
    id2label, label2id = label_maps(model_cfg)
    kwargs = dict(num_labels=model_cfg.num_labels, id2label=id2label, label2id=label2id)
    if model_cfg.from_config is not None:
        hf_config = AutoConfig.from_pretrained(path, **kwargs, **model_cfg.from_config)
        return AutoModelForSequenceClassification.from_config(hf_config)
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.name_or_path))
    if not tokenizer.is_fast:
        raise ValueError(f"model.name_or_path {model_cfg.name_or_path!r} has no fast tokenizer; fmdist needs one.")
    return tokenizer


def collate(
    rows: dict[str, Any], tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, num_labels: int
) -> dict[str, torch.Tensor]:
    """Columns of one micro-batch -> tensors, padded to the longest row in this batch (not max_length)."""
    texts = [str(t) for t in rows[data_cfg.text_column]]
    batch = dict(
        tokenizer(texts, truncation=True, max_length=data_cfg.max_length, padding="longest", return_tensors="pt")
    )
    labels = torch.as_tensor([int(v) for v in rows[data_cfg.label_column]], dtype=torch.long)
    bad = (labels < 0) | (labels >= num_labels)
    if bad.any():
        raise ValueError(
            f"data: column {data_cfg.label_column!r} has label {int(labels[bad][0])} outside [0, {num_labels}); "
            "fix the data or set model.num_labels."
        )
    batch["labels"] = labels
    return batch


def confusion_update(confusion: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add this batch to confusion[true, predicted] in place (stays on the device: no host sync)."""
    n = confusion.shape[0]
    predicted = logits.argmax(dim=-1)
    confusion += torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n).to(confusion.dtype)
