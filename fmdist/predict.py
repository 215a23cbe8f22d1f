"""Use an exported model: predict, or evaluate it on a labelled data set (no Ray needed).

Evaluation runs the task's own collate, count and finalize, the same code that evaluates during
training, so an export's metrics equal the run's on the same rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fmdist import tasks
from fmdist.config import Config, ModelConfig, default_packing
from fmdist.data.inputs import open_split
from fmdist.data.sources import iter_tables
from fmdist.tasks import DataInfo, Rows, Task
from fmdist.train.export import TRAINING_FILE

ARCHITECTURE_SUFFIXES = {
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForImageClassification": "image-classification",
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
    "ForMaskedLM": "masked-lm",
}
EVAL_CACHE = os.path.expanduser("~/.cache/fmdist/prepared")


def task_of(model_dir: str) -> Task:
    """The task an exported model was trained for: from fmdist's record, else its architecture."""
    record = Path(model_dir, TRAINING_FILE)
    if record.is_file():
        return tasks.get(json.loads(record.read_text())["config"]["model"]["task"])
    config_file = Path(model_dir, "config.json")
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir!r} has no config.json; pass a directory written by fmdist export.")
    for architecture in json.loads(config_file.read_text()).get("architectures") or []:
        for suffix, name in ARCHITECTURE_SUFFIXES.items():
            if architecture.endswith(suffix):
                return tasks.get(name)
    raise ValueError(f"{model_dir!r}: cannot tell its task from config.json's architectures; export it with fmdist.")


def predict(model_dir: str, inputs: list[Any]) -> list[dict[str, Any]]:
    """One prediction record per input (texts, or image paths for image classification)."""
    return task_of(model_dir).predict(model_dir, inputs)


@torch.no_grad()
def evaluate(
    model_dir: str,
    data: str,
    text_column: str | None = None,
    label_column: str | None = None,
    max_length: int = 128,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The task's metrics for an exported model on `data` (any form `data.eval` accepts)."""
    import transformers

    task = task_of(model_dir)
    model = getattr(transformers, task.export_class).from_pretrained(model_dir).eval()
    processor = task.load_processor(model_dir)
    cfg = Config(model=ModelConfig(name_or_path=model_dir, task=task.name))
    if task.labelled:
        cfg.model.label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        cfg.model.num_labels = len(cfg.model.label_names)
    cfg.data.text_column = text_column or task.input_column
    cfg.data.label_column = label_column or task.label_column
    cfg.data.max_length = max_length
    cfg.data.packing = default_packing(task.name)
    source = open_split(data, "--data", EVAL_CACHE)
    if task.prepare_split is not None:
        source = task.prepare_split(cfg, source, "--data", EVAL_CACHE)
    problems = task.check(cfg, DataInfo("--data", data, source.manifest["schema"], None))
    if problems:
        raise ValueError(
            " ".join(problems)
            .replace("data.text_column", "--text-column")
            .replace("data.label_column", "--label-column")
        )
    task.check_labels(cfg, source, "--data")
    return metrics_over(
        model, task, processor, cfg, (t.to_pydict() for t in iter_tables(source, batch_rows=batch_size))
    )


@torch.no_grad()
def metrics_over(
    model: torch.nn.Module, task: Task, processor: Any, cfg: Config, batches: Iterable[Rows]
) -> dict[str, Any]:
    """The task's metrics for `model` over batches of rows, in this process: the training loop's evaluation
    without ranks (the same collate, count and finalize), on the model's device."""
    device = next(model.parameters()).device
    counts = torch.zeros(task.counts_size(cfg), dtype=torch.float64, device=device)
    model.eval()
    for rows in batches:
        batch = task.collate(rows, processor, cfg)
        inputs = {k: v.to(device) for k, v in batch.items() if not k.startswith("stats/")}
        task.count(counts, model(**inputs), {**batch, **inputs}, cfg)
    return task.finalize(counts.tolist(), cfg)
