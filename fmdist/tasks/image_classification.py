"""Image classification: one label per image, decoded with Pillow, sized by the model's image processor.

The image column holds encoded bytes (PNG, JPEG, ...): plain binary, or the Hugging Face datasets
struct {bytes, path}. Processors are transformers' PIL-based ones, so torchvision is not needed.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import torch

from fmdist.config import Config
from fmdist.eval.metrics import confusion_metrics
from fmdist.models.resolve import resolve_model_path
from fmdist.tasks import DataInfo, Rows, Task
from fmdist.tasks.common import build_auto_model, check_class_labels, is_integer, missing_columns


def check(cfg: Config, info: DataInfo) -> list[str]:
    problems = missing_columns(cfg, info)
    if problems:
        return problems
    image, label = cfg.data.text_column, cfg.data.label_column
    kind = info.columns[image]
    if kind not in ("binary", "large_binary") and not (kind.startswith("struct<") and "bytes:" in kind):
        problems.append(
            f"{info.field}: column {image!r} of {info.uri!r} is {kind}, not encoded image bytes; give PNG/JPEG "
            "bytes (binary, or the datasets struct {bytes, path}); fmdist prepare IMAGE_DIR writes them."
        )
    if not is_integer(info.columns[label]):
        problems.append(
            f"{info.field}: column {label!r} of {info.uri!r} is {info.columns[label]}, not an integer class id."
        )
    return problems


def load_processor(path: str) -> Any:
    from transformers import AutoImageProcessor

    # The PIL-based ("slow") processor: the fast one needs torchvision, which the CPU torch wheel lacks.
    return AutoImageProcessor.from_pretrained(resolve_model_path(path), use_fast=False)


def build_model(cfg: Config) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification

    return build_auto_model(AutoModelForImageClassification, cfg.model)


def decode(value: Any, where: str) -> Any:
    """Encoded bytes (or a datasets {bytes, path} struct) -> an RGB PIL image; errors say where."""
    from PIL import Image, UnidentifiedImageError

    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise ValueError(f"{where}: the image is empty (no bytes); fix or remove that row.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: the image cannot be decoded ({exc}); fix or remove that row.") from None
    return image.convert("RGB")


def collate(rows: Rows, processor: Any, cfg: Config, seed: int | None = None) -> dict[str, torch.Tensor]:
    n = len(rows[cfg.data.label_column])
    shards, ids = rows.get("_shard") or [None] * n, rows.get("row_id") or [None] * n
    images = [
        decode(value, f"data: shard {shard!r} row_id {rid}" if shard else f"data: row_id {rid}")
        for value, shard, rid in zip(rows[cfg.data.text_column], shards, ids, strict=True)
    ]
    labels = torch.as_tensor([int(v) for v in rows[cfg.data.label_column]], dtype=torch.long)
    bad = (labels < 0) | (labels >= cfg.model.num_labels)
    if bad.any():
        raise ValueError(
            f"data: column {cfg.data.label_column!r} has label {int(labels[bad][0])} outside "
            f"[0, {cfg.model.num_labels}); fix the data or set model.label_names."
        )
    return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": labels}


@functools.cache
def _blank_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def predict(model_dir: str, images: list[str]) -> list[dict[str, Any]]:
    """Labels and scores for image files, via transformers' own pipeline (the export's contract)."""
    from PIL import Image
    from transformers import pipeline

    classify = pipeline("image-classification", model=model_dir, device="cpu", use_fast=False)
    out = []
    for path in images:
        with Image.open(path) as image:
            scores = classify(image.convert("RGB"), top_k=None)
        out.append({"label": scores[0]["label"], "probabilities": {s["label"]: float(s["score"]) for s in scores}})
    return out


TASK = Task(
    name="image-classification",
    input_column="image",
    label_column="label",
    check=check,
    check_labels=check_class_labels,
    build_model=build_model,
    load_processor=load_processor,
    collate=collate,
    placeholder=lambda cfg: {cfg.data.text_column: [_blank_png()], cfg.data.label_column: [0]},
    **confusion_metrics(),
    export_class="AutoModelForImageClassification",
    pipeline_tag="image-classification",
    predict=predict,
)
