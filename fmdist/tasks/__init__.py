"""The task contract: everything that differs between tasks, as a plain record of functions.

The loop, launch, export, predict and eval ask `TASKS[cfg.model.task]` for what differs and own
nothing task-specific themselves. Adding a task means writing its module and listing it here.

A task's metrics travel as one fixed-size float64 tensor of counts: every rank fills its own with
`count`, one all-reduce sums them, and `finalize` turns the sum into metrics. Distributed metrics
therefore equal single-process ones exactly, and eval needs one collective whatever the task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fmdist.config import Config

Rows = dict[str, list[Any]]
"""One micro-batch of raw columns (column name -> values), before the processor."""
Metrics = dict[str, Any]
"""What `finalize` returns: at least `loss`, `num_examples`, `headline` (the name of the main metric),
`scalars` (name -> float, reported to Ray Train/Tune as eval/<name>) and whatever the report shows."""


@dataclass(frozen=True)
class DataInfo:
    """What the checks before training know about one split, without reading its rows."""

    field: str
    """The config field it came from, e.g. data.train."""
    uri: str
    columns: dict[str, str]
    """Column name -> Arrow type (as text)."""
    label_names: list[str] | None
    """The label vocabulary that `fmdist prepare` recorded, if any."""


@dataclass(frozen=True)
class Task:
    name: str
    """The `model.task` value, e.g. token-classification."""
    input_column: str
    """Default `data.text_column`: the column holding the input (text, word list or image)."""
    label_column: str
    """Default `data.label_column`."""
    check: Callable[[Config, DataInfo], list[str]]
    """Problems with one split's columns for this task (empty when fine), each naming field and fix."""
    check_labels: Callable[[Config, Any, str], None]
    """(config, Source, field): raise naming the file and row of the first label outside the label set."""
    build_model: Callable[[Config], torch.nn.Module]
    """A model with a head for `cfg.model.label_names`; call after seeding (ranks must agree)."""
    load_processor: Callable[[str], Any]
    """Tokenizer or image processor from a model directory (the config's or a checkpoint's)."""
    collate: Callable[[Rows, Any, Config, int | None], dict[str, torch.Tensor]]
    """(rows, processor, config, seed) -> model inputs. Keys starting with `stats/` are counters for the
    loop and `count`, not model inputs. `seed` drives a task's randomness (masked-lm's masking): the loop
    derives it from the rank and iter, so a resumed run draws the same; None in evaluation."""
    placeholder: Callable[[Config], Rows]
    """One row the collate accepts, for a rank that ran out of data (its loss is multiplied by 0)."""
    counts_size: Callable[[Config], int]
    """Length of the metric-count tensor."""
    count: Callable[[torch.Tensor, Any, dict[str, torch.Tensor], Config], None]
    """Add one eval batch (model output, collated batch with its `stats/` counters) to the counts in place."""
    finalize: Callable[[list[float], Config], Metrics]
    """Summed counts -> metrics."""
    format_report: Callable[[Metrics], str]
    """The metrics as a fixed-width table for the console and the model card."""
    export_class: str
    """The transformers Auto class the export loads with, e.g. AutoModelForTokenClassification."""
    pipeline_tag: str
    """Hugging Face pipeline tag of the export (model card metadata, `pipeline(...)`)."""
    predict: Callable[[str, list[Any]], list[dict[str, Any]]]
    """(exported model dir, inputs) -> one prediction record per input."""
    loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] = lambda out, batch: out.loss
    """Training loss from the model output; by default the model's own."""
    labelled: bool = True
    """False for tasks that learn from the input alone (language modelling): no label set is frozen or checked."""
    prepare_split: Callable[[Config, Any, str, str], Any] | None = None
    """(config, Source, field, cache dir) -> the Source to train on, made before training (LM packing)."""


@functools.cache
def registry() -> dict[str, Task]:
    """Every task by `model.task` name."""
    from fmdist.tasks import image_classification, language_modeling, sequence_classification, token_classification

    tasks = (
        sequence_classification.TASK,
        token_classification.TASK,
        image_classification.TASK,
        language_modeling.CAUSAL_LM,
        language_modeling.MASKED_LM,
    )
    return {t.name: t for t in tasks}


def get(name: str) -> Task:
    """The task registered under `name` (a validated `model.task`)."""
    tasks = registry()
    if name not in tasks:
        raise ValueError(f"model.task: unknown task {name!r}; use one of {', '.join(tasks)}.")
    return tasks[name]
