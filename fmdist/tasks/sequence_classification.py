"""Sequence classification: one label per text (sentiment, topic, intent)."""

from __future__ import annotations

from typing import Any

import torch

from fmdist.config import Config
from fmdist.eval.metrics import confusion_metrics
from fmdist.tasks import DataInfo, Rows, Task
from fmdist.tasks.common import (
    build_auto_model,
    check_class_labels,
    is_integer,
    is_string,
    load_tokenizer,
    missing_columns,
)


def check(cfg: Config, info: DataInfo) -> list[str]:
    problems = missing_columns(cfg, info)
    if problems:
        return problems
    text, label = cfg.data.text_column, cfg.data.label_column
    if not is_string(info.columns[text]):
        problems.append(
            f"{info.field}: column {text!r} of {info.uri!r} is {info.columns[text]}, not text; "
            "sequence classification reads one string per row (set data.text_column)."
        )
    if not is_integer(info.columns[label]):
        problems.append(
            f"{info.field}: column {label!r} of {info.uri!r} is {info.columns[label]}, not an integer class id; "
            "map the labels to 0..num_labels-1 (model.label_names names them)."
        )
    return problems


def build_model(cfg: Config) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return build_auto_model(AutoModelForSequenceClassification, cfg.model)


def collate(rows: Rows, tokenizer: Any, cfg: Config, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Columns of one micro-batch -> tensors, padded to the longest row in this batch (not max_length)."""
    texts = [str(t) for t in rows[cfg.data.text_column]]
    batch = dict(
        tokenizer(texts, truncation=True, max_length=cfg.data.max_length, padding="longest", return_tensors="pt")
    )
    labels = torch.as_tensor([int(v) for v in rows[cfg.data.label_column]], dtype=torch.long)
    bad = (labels < 0) | (labels >= cfg.model.num_labels)
    if bad.any():
        raise ValueError(
            f"data: column {cfg.data.label_column!r} has label {int(labels[bad][0])} outside "
            f"[0, {cfg.model.num_labels}); fix the data or set model.label_names."
        )
    batch["labels"] = labels
    return batch


@torch.no_grad()
def predict(model_dir: str, texts: list[str], max_length: int = 128, batch_size: int = 64) -> list[dict]:
    """For each text: the predicted label name, its id and the probability of every label."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    id2label = model.config.id2label
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        for row in model(**enc).logits.softmax(-1).tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": id2label[best],
                    "label_id": best,
                    "probabilities": {id2label[j]: p for j, p in enumerate(row)},
                }
            )
    return out


TASK = Task(
    name="sequence-classification",
    input_column="sentence",
    label_column="label",
    check=check,
    check_labels=check_class_labels,
    build_model=build_model,
    load_processor=load_tokenizer,
    collate=collate,
    placeholder=lambda cfg: {cfg.data.text_column: [""], cfg.data.label_column: [0]},
    **confusion_metrics(),
    export_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification",
    predict=predict,
)
