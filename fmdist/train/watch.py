"""The curves a run leaves behind: TensorBoard event files, MLflow metrics, and `curves.png`.

Rank 0 of the training loop records every log step's scalars (loss, learning rate, throughput, MFU on
a GPU) and every evaluation's into `<run_dir>/tensorboard/`, so that `tensorboard --logdir runs/`
shows every run and every Tune trial (each trial is a run directory). When `MLFLOW_TRACKING_URI` is
set, the same scalars go to MLflow; a resumed run continues its MLflow run (found by its run directory).
At the end `<run_dir>/curves.png` is drawn from the event files, so the picture covers every attempt of
a run that was resumed: where two attempts logged the same step, the later one's value is drawn.

The event files are the one record of the curves. A remote run directory (s3://) gets them from a local
copy at every checkpoint and at the end; the copy is written by tensorboardX, read back here without
TensorFlow or the tensorboard package.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from fmdist.config import Config, run_dir_uri
from fmdist.data.fs import filesystem

TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
MLFLOW_RUN_DIR_TAG = "fmdist.run_dir"


@dataclass
class Watch:
    """Rank 0's sinks for one attempt of a run."""

    run_dir: str
    """The run directory (local path or URI) that receives tensorboard/ and curves.png."""
    events_dir: str
    """Where this attempt's event file is written: run_dir/tensorboard when local, a scratch copy otherwise."""
    writer: Any
    """tensorboardX's SummaryWriter."""
    mlflow: tuple[Any, str] | None = None
    """(MlflowClient, run id) when MLFLOW_TRACKING_URI is set."""


def open_watch(cfg: Config, rank: int, scratch_dir: str) -> Watch | None:
    """The sinks of rank 0 (None on other ranks: one record of the curves per run)."""
    if rank != 0:
        return None
    from tensorboardX import SummaryWriter

    directory = run_dir_uri(cfg)
    local = isinstance(filesystem(directory)[0], pafs.LocalFileSystem)
    events_dir = f"{directory}/{TENSORBOARD_DIR}" if local else os.path.join(scratch_dir, TENSORBOARD_DIR)
    os.makedirs(events_dir, exist_ok=True)
    # flush_secs: a watcher of a long run sees its curves within half a minute.
    watch = Watch(directory, events_dir, SummaryWriter(events_dir, flush_secs=30))
    watch.mlflow = _open_mlflow(cfg, directory)
    return watch


def record(watch: Watch | None, step: int, scalars: Mapping[str, float]) -> None:
    """Add one step's scalars (non-finite values are left out: a NaN would blank TensorBoard's axes)."""
    if watch is None:
        return
    finite = {k: float(v) for k, v in scalars.items() if isinstance(v, int | float) and math.isfinite(v)}
    for name, value in finite.items():
        watch.writer.add_scalar(name, value, step)
    if watch.mlflow is not None and finite:
        client, run_id = watch.mlflow
        client.log_batch(run_id, metrics=_mlflow_metrics(finite, step))


def sync(watch: Watch | None) -> None:
    """Flush the event file, and copy it to a remote run directory (at checkpoints and at the end)."""
    if watch is None:
        return
    watch.writer.flush()
    if watch.events_dir.startswith(watch.run_dir):
        return  # written in place
    fs, path = filesystem(f"{watch.run_dir}/{TENSORBOARD_DIR}")
    fs.create_dir(path, recursive=True)
    for name in os.listdir(watch.events_dir):
        with open(os.path.join(watch.events_dir, name), "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
            dst.write(src.read())


def close(watch: Watch | None) -> str | None:
    """End the attempt: close the event file, copy it out, end the MLflow run, draw curves.png (its URI)."""
    if watch is None:
        return None
    watch.writer.close()
    sync(watch)
    if watch.mlflow is not None:
        client, run_id = watch.mlflow
        client.set_terminated(run_id)
    series = read_events(f"{watch.run_dir}/{TENSORBOARD_DIR}")
    if not series:
        return None
    figure = plot_curves(series, os.path.basename(watch.run_dir))
    fs, path = filesystem(f"{watch.run_dir}/{CURVES_FILE}")
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    with fs.open_output_stream(path) as out:
        out.write(buffer.getvalue())
    return f"{watch.run_dir}/{CURVES_FILE}"


# ---- MLflow ------------------------------------------------------------------------------------------


def _open_mlflow(cfg: Config, directory: str) -> tuple[Any, str] | None:
    uri = os.environ.get(MLFLOW_URI_ENV)
    if not uri:
        return None
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise RuntimeError(
            f"{MLFLOW_URI_ENV}={uri} asks for MLflow logging, but mlflow is not installed where the workers run: "
            "pip install 'fmdist[mlflow]' there (or unset MLFLOW_TRACKING_URI)"
        ) from exc
    client = MlflowClient(uri)
    name = os.environ.get(MLFLOW_EXPERIMENT_ENV, "fmdist")
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    # A resumed run (or a relaunch) continues the MLflow run of its run directory.
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{MLFLOW_RUN_DIR_TAG}` = '{directory}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return client, run_id
    run = client.create_run(experiment_id, run_name=cfg.run.name, tags={MLFLOW_RUN_DIR_TAG: directory})
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in _flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return client, run.info.run_id


def _mlflow_metrics(scalars: Mapping[str, float], step: int) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(name, value, now, step) for name, value in scalars.items()]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---- reading event files and drawing ---------------------------------------------------------------


def read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `directory` (local or URI): tag -> [(step, value)] by step.

    Files are read oldest first (tensorboardX names them by creation time), so where a resumed attempt
    logged a step again, its value replaces the earlier attempt's.
    """
    from tensorboardX.proto.event_pb2 import Event

    fs, path = filesystem(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return {}
    files = sorted(
        (i for i in infos if i.is_file and "tfevents" in i.base_name),
        key=lambda i: (_event_file_time(i.base_name), i.mtime_ns or 0),
    )
    names = [i.path for i in files]
    by_tag: dict[str, dict[int, float]] = {}
    for name in names:
        with fs.open_input_stream(name) as f:
            data = f.read()
        for record in _records(data):
            event = Event.FromString(record)
            for value in event.summary.value:
                scalar = value.simple_value if value.HasField("simple_value") else None
                if scalar is None and value.tensor.float_val:
                    scalar = value.tensor.float_val[0]
                if scalar is not None:
                    by_tag.setdefault(value.tag, {})[event.step] = scalar
    return {tag: sorted(points.items()) for tag, points in by_tag.items()}


def _event_file_time(name: str) -> float:
    """events.out.tfevents.<unix time>.<host>: the creation time, for ordering attempts."""
    try:
        return float(name.split("tfevents.", 1)[1].split(".")[0])
    except (IndexError, ValueError):
        return 0.0


def _records(data: bytes) -> list[bytes]:
    """The payloads of a TFRecord stream: [u64 length][u32 crc][payload][u32 crc] repeated.

    A torn last record (a worker killed mid-write) is dropped; the checksums are not verified.
    """
    records, at = [], 0
    while at + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        start, end = at + 12, at + 12 + length
        if end + 4 > len(data):
            break
        records.append(data[start:end])
        at = end + 4
    return records


def plot_curves(series: Mapping[str, list[tuple[int, float]]], title: str) -> Any:
    """The run's curves on one figure: loss (train and eval), the evaluation metrics, the learning rate,
    samples/s, and MFU when measured (tokens/s is in the event files). Panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_metrics = [t for t in series if t.startswith("eval/") and t != "eval/loss" and "/f1_" not in t][:4]
    panels = [
        ("loss", [t for t in ("train/loss", "eval/loss") if t in series]),
        ("evaluation", eval_metrics),
        ("learning rate", [t for t in ("train/lr",) if t in series]),
        ("samples/s", [t for t in ("train/samples_per_s",) if t in series]),
        ("MFU", [t for t in ("train/mfu",) if t in series]),
    ]
    panels = [(name, tags) for name, tags in panels if tags]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, tags) in zip(axes[0], panels, strict=True):
        for tag in tags:
            steps, values = zip(*series[tag], strict=True)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=tag)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(tags) > 1:
            ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
