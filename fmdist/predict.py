"""Use an exported model: predict labels for texts, evaluate it on a labelled data set (no Ray needed)."""

from __future__ import annotations

from typing import Any

import torch

from fmdist.data.sources import iter_tables, resolve
from fmdist.eval.metrics import classification_metrics


def load(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def predict(model: Any, tokenizer: Any, texts: list[str], max_length: int = 128, batch_size: int = 64) -> list[dict]:
    """For each text: the predicted label name, its id and the probability of every label."""
    id2label = model.config.id2label
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        probs = model(**enc).logits.softmax(-1)
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": id2label[best],
                    "label_id": best,
                    "probabilities": {id2label[j]: p for j, p in enumerate(row)},
                }
            )
    return out


@torch.no_grad()
def evaluate(
    model_dir: str, data: str, text_column: str = "sentence", label_column: str = "label", max_length: int = 128
) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1 and the confusion matrix of an exported model on `data`."""
    model, tokenizer = load(model_dir)
    n = model.config.num_labels
    confusion = [[0] * n for _ in range(n)]
    loss_sum = 0.0
    source = resolve(data, "--data")
    for table in iter_tables(source, batch_rows=64):
        for column in (text_column, label_column):
            if column not in table.column_names:
                raise ValueError(f"--data {data!r} has no column {column!r}; it has {table.column_names}.")
        texts = [str(t) for t in table.column(text_column).to_pylist()]
        labels = torch.tensor(table.column(label_column).to_pylist(), dtype=torch.long)
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out = model(**enc, labels=labels)
        loss_sum += out.loss.item() * len(labels)
        for t, p in zip(labels.tolist(), out.logits.argmax(-1).tolist(), strict=True):
            confusion[t][p] += 1
    names = [model.config.id2label[i] for i in range(n)]
    return classification_metrics(confusion, loss_sum, names)
