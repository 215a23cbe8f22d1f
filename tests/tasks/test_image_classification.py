"""Image classification: decoding both image column forms, clear errors for corrupt images, and the
loop in-process (world size 1) learning synthetic shapes and resuming to the same weights."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from fmdist.config import from_dict
from fmdist.data.prepare import prepare
from fmdist.data.sources import resolve
from fmdist.data.stream import EpochStreams
from fmdist.tasks import get
from fmdist.train.checkpoint import consolidated_state_dict
from tests.inprocess import run_in_process

TASK = get("image-classification")
SHAPES = ("bar", "column", "square")


def shape_png(shape: str, rng: random.Random, size: int = 16) -> bytes:
    """A noisy grey image with one bright horizontal bar, vertical bar or square."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (size, size), color=rng.randint(0, 60))
    draw = ImageDraw.Draw(image)
    at = rng.randint(3, size - 4)
    box = {"bar": (0, at, size, at + 2), "column": (at, 0, at + 2, size), "square": (at - 3, at - 3, at + 3, at + 3)}
    draw.rectangle(box[shape], fill=rng.randint(180, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = random.Random(seed)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / shape / f"{i:04d}.png").write_bytes(shape_png(shape, rng))
    return root


def tiny_image_model(directory: Path) -> str:
    """A two-stage ResNet (config only, no weights: fmdist builds it fresh) and a PIL processor."""
    from transformers import ResNetConfig, ViTImageProcessor

    ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        downsample_in_first_stage=False,
    ).save_pretrained(directory)  # fmt: skip
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        directory
    )
    return str(directory)


def image_config(model_dir: str, **train) -> dict:
    return {
        "model": {"name_or_path": model_dir, "task": "image-classification"},
        "data": {"train": "unused-by-the-loop", "shuffle_window_rows": 64},
        "train": {"micro_batch_size": 16, "lr": 3e-3, "log_every_steps": 20, **train},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
    }


def test_collate_decodes_bytes_and_datasets_structs_and_names_a_corrupt_row(tmp_path):
    model_dir = tiny_image_model(tmp_path / "model")
    cfg = from_dict(image_config(model_dir, max_steps=1))
    cfg.model.label_names, cfg.model.num_labels = list(SHAPES), 3
    processor = TASK.load_processor(model_dir)
    png = shape_png("bar", random.Random(0))
    plain = TASK.collate({"image": [png], "label": [0]}, processor, cfg)
    struct = TASK.collate({"image": [{"bytes": png, "path": "a.png"}], "label": [0]}, processor, cfg)
    assert plain["pixel_values"].shape == (1, 3, 16, 16)
    assert plain["pixel_values"].equal(struct["pixel_values"])
    with pytest.raises(ValueError, match="row_id 7: the image cannot be decoded"):
        TASK.collate({"image": [png, b"not an image"], "label": [0, 1], "row_id": [6, 7]}, processor, cfg)


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    """Shapes prepared from an image folder (fmdist prepare), then uninterrupted / paused / resumed runs."""
    root = tmp_path_factory.mktemp("images")
    prepare([str(image_folder(root / "folder", 120, seed=1))], str(root / "data"), eval_fraction=0.2,
            rows_per_shard=48)  # fmt: skip
    train, evaluation = resolve(str(root / "data/train")), resolve(str(root / "data/eval"))
    model_dir = tiny_image_model(root / "model")

    def run(name: str, stop: int | None = None, restore: str | None = None, steps: int = 60) -> tuple[dict, str]:
        cfg = from_dict(image_config(model_dir, max_steps=steps))
        cfg.model.label_names, cfg.model.num_labels = train.manifest["label_names"], 3
        summary, reports = run_in_process(cfg, train, str(root / name), evaluation, stop=stop, restore=restore)
        return summary, reports[-1][1]

    paused = run("paused", stop=13)  # mid-epoch: about 288 rows / 16 = 18 iters per epoch
    return {
        "whole": run("whole"),
        "resumed": run("resumed", restore=paused[1]),
        "eval_rows": evaluation.manifest["total_rows"],
        "label_names": train.manifest["label_names"],
    }


def test_images_are_learned_and_counted_once(image_runs):
    metrics = image_runs["whole"][0]["eval"]
    assert image_runs["label_names"] == sorted(SHAPES)
    assert metrics["num_examples"] == image_runs["eval_rows"]
    assert metrics["accuracy"] > 0.9, metrics["confusion_matrix"]  # chance is 1/3


def test_images_resumed_mid_epoch_end_with_the_same_weights(image_runs):
    a = consolidated_state_dict(image_runs["whole"][1])
    b = consolidated_state_dict(image_runs["resumed"][1])
    assert max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point()) < 1e-6


def test_a_corrupt_image_in_the_stream_names_its_shard_and_row(tmp_path):
    """Plain Parquet (no prepare, so nothing checked the images before): the error names the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = shape_png("bar", random.Random(1))
    shard = tmp_path / "data" / "part-1.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"row_id": [10, 11], "image": [good, b"\x89PNG broken"], "label": [0, 1]}), shard)
    model_dir = tiny_image_model(tmp_path / "model")
    cfg = from_dict(image_config(model_dir, max_steps=1, micro_batch_size=2))
    cfg.model.label_names, cfg.model.num_labels = list(SHAPES), 3
    [batch] = EpochStreams(cfg, resolve(str(shard.parent)), rank=0, world_size=1).batches(0)
    with pytest.raises(ValueError, match=r"shard '.*part-1.parquet' row_id 11: the image cannot be decoded"):
        TASK.collate(batch, TASK.load_processor(model_dir), cfg)
