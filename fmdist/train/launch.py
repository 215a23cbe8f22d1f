"""Config -> Ray Train TorchTrainer: start or join Ray, check the data, wire streams and checkpoints, run `loop.fit`.

The driver settles everything the workers must agree on before they start: the shards behind each
input (data/inputs.py), the frozen label set, and the task's checks of columns and labels, so that a
bad input fails in seconds with its file and row named, not on a worker minutes later.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import yaml

from fmdist import tasks
from fmdist.config import Config, ConfigError, freeze_labels, from_dict, run_dir_uri
from fmdist.data.fs import aws_env, filesystem
from fmdist.data.inputs import open_splits
from fmdist.data.sources import PROVENANCE_FILE, Source, provenance, resolve
from fmdist.data.stream import EpochStreams, eval_batches
from fmdist.runtime import (
    FAIL_AT_STEP_ENV,
    HANG_AT_STEP_ENV,
    KILL_AT_STEP_ENV,
    KILL_MID_UPLOAD_ENV,
    RECORD_ROWS_ENV,
    drill_step,
    get_logger,
)
from fmdist.tasks import DataInfo
from fmdist.train import checkpoint, console, watch

log = get_logger("fmdist")

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def write_run_file(cfg: Config, name: str, text: str) -> str:
    """Write a small file into the run directory (local or s3://); returns its URI."""
    fs, path = filesystem(run_dir_uri(cfg))
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())
    return f"{run_dir_uri(cfg)}/{name}"


def resume_point(cfg: Config) -> tuple[bool, str | None]:
    """Where a launch starts: (True, None) when Ray Train resumes from its snapshot of the run's
    checkpoints; (False, checkpoint URI) when the run directory has checkpoints but no snapshot;
    (False, None) for a fresh start.

    Without a snapshot Ray Train would start again from step 0, silently. That happens when the
    driver was stopped after a worker uploaded a checkpoint but before Ray recorded it (a Tune trial
    interrupted mid-save), or when the snapshot was lost. The newest complete checkpoint is resumed
    from instead, announced; newer incomplete ones are named and passed over.
    """
    fs, path = filesystem(run_dir_uri(cfg))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if any(i.base_name == SNAPSHOT_FILE for i in infos):
        return True, None
    newest, skipped = newest_own_checkpoint(cfg)
    if newest is None and not skipped:
        return False, None
    for line in skipped:
        log.warning("passing over an incomplete checkpoint (the run stopped while saving it): %s", line)
    if newest is None:
        log.warning("run directory %s has no complete checkpoint, so this run starts from step 0", run_dir_uri(cfg))
    else:
        log.warning("run directory %s has no %s (Ray stopped before recording its last checkpoint); resuming "
                    "from the newest complete one, %s", run_dir_uri(cfg), SNAPSHOT_FILE, newest)  # fmt: skip
    return False, newest


def newest_own_checkpoint(cfg: Config) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint in this run's directory (local or S3), and a line for each newer,
    incomplete one passed over."""
    fs, path = filesystem(run_dir_uri(cfg))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = [i.base_name for i in infos if i.base_name.startswith(checkpoint.CHECKPOINT_PREFIX)]
    return checkpoint.newest_complete(run_dir_uri(cfg), names) if names else (None, [])


def failure_message(cfg: Config, error: BaseException) -> str:
    """What a run that failed past its restarts tells the user: the cause, and how to resume it."""
    cause = str(error).strip() or type(error).__name__
    newest, _ = newest_own_checkpoint(cfg)
    where = (
        f"from its newest complete checkpoint, {newest}," if newest else "from step 0 (it has no complete checkpoint)"
    )
    return (
        f"run {run_dir_uri(cfg)} failed after run.max_failures={cfg.run.max_failures} restart(s): {cause}\n"
        f"Fix the cause and launch the same command again (same run.name and run.storage_path): it resumes "
        f"{where} on any worker count that divides its data slots."
    )


def ensure_ray(cfg: Config, trials_at_once: int = 1, quiet: bool = False) -> float:
    """Join the cluster (RAY_ADDRESS or inside `ray job submit`) or start a local Ray in-process.

    A local Ray is sized for `trials_at_once` runs of `scaling.num_workers` (a PBT population needs
    two). `quiet`: the workers' own output is not forwarded here and Ray's INFO lines are not printed
    (train/console.py relays fmdist's lines instead). Returns the seconds spent starting Ray.
    """
    import logging

    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        return 0.0
    verbosity = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else logging.INFO}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**verbosity)
    else:
        # A local Ray gets one logical CPU per run on top of its workers (the Tune trial's process),
        # and one more: Ray Data's read and split tasks need CPU too (with every CPU held by train
        # workers the stream stalls).
        reserved = trials_at_once * (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1)
        num_cpus = max(os.cpu_count() or 1, int(reserved) + 1)
        # The dashboard also serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": aws_env()}, **verbosity)
    return time.perf_counter() - t0


def resolve_use_gpu(cfg: Config) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.scaling.use_gpu == "auto":
        return gpus > 0
    if cfg.scaling.use_gpu and gpus == 0:
        raise RuntimeError(
            "scaling.use_gpu is true but the Ray cluster has no GPUs; set scaling.use_gpu=auto or false."
        )
    return bool(cfg.scaling.use_gpu)


def cache_dir(cfg: Config) -> str:
    return cfg.data.cache_dir or f"{cfg.run.storage_path.rstrip('/')}/.cache"


def open_data(cfg: Config) -> dict[str, Source]:
    """The shards of each split, with the label set frozen into `cfg` and the task's checks passed.

    Raises:
        ConfigError: every column problem of every split at once, each naming the field and the fix.
        ValueError: a label outside the label set (naming the file and row), or an empty split.
    """
    sources = open_splits(cfg.data.train, cfg.data.eval, cache_dir(cfg), cfg.data.eval_fraction, cfg.train.seed)
    task = tasks.get(cfg.model.task)
    if task.labelled:
        freeze_labels(cfg, sources["train"].manifest.get("label_names"))
    if task.prepare_split is not None:
        sources = {
            split: task.prepare_split(cfg, source, f"data.{split}", cache_dir(cfg)) for split, source in sources.items()
        }
    problems = []
    for split, source in sources.items():
        info = DataInfo(f"data.{split}", source.uri, source.manifest["schema"], source.manifest.get("label_names"))
        problems += task.check(cfg, info)
    if problems:
        raise ConfigError(problems)
    for split, source in sources.items():
        if source.manifest["total_rows"] == 0:
            raise ValueError(f"data.{split}: {source.uri!r} has no rows; point it at a non-empty data set.")
        task.check_labels(cfg, source, f"data.{split}")
    return sources


def _kill_mid_upload(step: int) -> None:
    """Drill (FMDIST_KILL_MID_UPLOAD): make this worker SIGKILL itself halfway through uploading the
    checkpoint of `step` to the run's storage, file by file through Ray Train's own copy, so the storage
    (local or S3) holds a torn checkpoint as a worker lost mid-upload leaves it. Only a fresh run drills."""
    import signal
    from pathlib import Path

    from ray.train.v2._internal.execution import storage

    copy = storage._pyarrow_fs_copy_files
    target = f"{checkpoint.CHECKPOINT_PREFIX}{step:08d}"

    def copy_half_then_die(source, destination, source_filesystem=None, destination_filesystem=None, **kwargs):
        if destination.rstrip("/").rsplit("/", 1)[-1] != target:
            return copy(source, destination, source_filesystem, destination_filesystem, **kwargs)
        files = sorted(f for f in Path(source).rglob("*") if f.is_file())
        for file in files[: len(files) // 2]:
            relative = file.relative_to(source).as_posix()
            destination_filesystem.create_dir(f"{destination}/{relative}".rsplit("/", 1)[0], recursive=True)
            copy(str(file), f"{destination}/{relative}", destination_filesystem=destination_filesystem)
        log.warning("%s: killed after uploading %d of %d files of %s (a drill)", KILL_MID_UPLOAD_ENV,
                    len(files) // 2, len(files), target)  # fmt: skip
        os.kill(os.getpid(), signal.SIGKILL)

    storage._pyarrow_fs_copy_files = copy_half_then_die


def _train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: rebuild the config, wire its streams and reporting to `fit`."""
    from fmdist.runtime import use_cpu_accelerator_if_no_gpu

    use_cpu_accelerator_if_no_gpu()
    import ray.train

    from fmdist.train.loop import LoopIO, fit

    cfg = from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    # The launcher's console (quiet runs): fmdist's lines and rank 0's progress go there, nothing else.
    step_done = console.attach(loop_config["console"], rank) if loop_config["console"] is not None else None
    world_size = ray.train.get_context().get_world_size()
    restore = ray.train.get_checkpoint()  # this run's own latest (after a worker failure or relaunch)
    if restore is None:
        # Ray Train loses the reports a worker queued but the controller had not collected when the
        # worker group died (a death right after a checkpoint), and would restart from step 0. A
        # complete checkpoint in the run's own storage is this run's: resume from the newest.
        own, _ = newest_own_checkpoint(cfg)
        if own is not None:
            if rank == 0:
                log.warning("Ray Train gave this attempt no checkpoint, but the run directory has complete ones "
                            "(a report lost when a worker died); resuming from the newest, %s", own)  # fmt: skip
            fs, path = filesystem(own)
            restore = ray.train.Checkpoint(path, filesystem=fs)
    from_elsewhere = restore is None and loop_config["restore_from"] is not None
    if from_elsewhere:
        # Another run's checkpoint (a PBT round continuing its own or a donor trial's): every worker
        # reads all of it, as after a restart.
        fs, path = filesystem(loop_config["restore_from"])
        restore = ray.train.Checkpoint(path, filesystem=fs)
    upload_drill = drill_step(KILL_MID_UPLOAD_ENV, rank)
    if upload_drill is not None and restore is None:
        _kill_mid_upload(upload_drill)
    if restore is not None:  # possibly written by another worker count: lay the run out to fit it
        with restore.filesystem.open_input_stream(f"{restore.path}/{checkpoint.STATE_FILE}") as f:
            cfg = checkpoint.resume_layout(cfg, json.loads(f.read()), world_size)
    stream = EpochStreams(cfg, resolve(loop_config["train_uri"], "data.train"), rank, world_size)
    eval_source = resolve(loop_config["eval_uri"], "data.eval") if loop_config["eval_uri"] else None
    train_batches = stream.batches
    record_dir = os.environ.get(RECORD_ROWS_ENV)
    if record_dir:
        # Drill/test hook: log the row ids of every real micro-batch handed to the loop, one JSON line
        # each, appended and flushed per line (a killed worker leaves whole lines); the pid tells a
        # restarted attempt's lines from the failed one's. Placeholders (None) train no rows.
        def recorded_batches(epoch: int) -> Iterator[dict[str, list] | None]:
            os.makedirs(record_dir, exist_ok=True)
            with open(os.path.join(record_dir, f"rows_rank{rank}.jsonl"), "a") as out:
                for rows in stream.batches(epoch):
                    if rows is not None:
                        line = {"rank": rank, "epoch": epoch, "pid": os.getpid(), "row_ids": rows.get("row_id")}
                        out.write(json.dumps(line) + "\n")
                        out.flush()
                    yield rows

        train_batches = recorded_batches

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        saved = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(
            metrics,
            checkpoint=saved,
            checkpoint_dir_name=f"checkpoint_step_{metrics['step']:08d}" if saved else None,
            delete_local_checkpoint_after_upload=saved is not None,
        )

    scratch = tempfile.mkdtemp(prefix="fmdist-ckpt-")
    io = LoopIO(
        train_batches=train_batches,
        iters_per_epoch=stream.iters_per_epoch,
        num_train_rows=stream.source.manifest["total_rows"],
        report=report,
        scratch_dir=scratch,
        eval_batches=(lambda: eval_batches(eval_source, rank, world_size, cfg.train.micro_batch_size))
        if eval_source is not None
        else None,
        data_state=stream.state,
        restore_data_state=stream.restore,
        launch_time=loop_config["launch_time"],
        timings=loop_config["timings"],
        stop_at_step=loop_config["stop_at_step"],
        fingerprint_restore=from_elsewhere,
        write_curves=True,
        step_done=step_done,
    )
    try:
        if restore is None:
            fit(cfg, io)
        else:
            with restore.as_directory() as restore_dir:
                io.restore_dir = restore_dir
                fit(cfg, io)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # reported checkpoints were moved out; the rest is spent


def hardware(cfg: Config, use_gpu: bool) -> str:
    """The workers' hardware in words, for the model card (the driver's view: one node type assumed)."""
    import platform

    import torch

    if use_gpu:  # the driver may sit on a CPU-only head node: then the GPU's name is unknown here
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        device = f"{cfg.scaling.gpus_per_worker:g} x {name} per worker"
    else:
        device = f"{cfg.scaling.cpus_per_worker:g} CPU(s) per worker, {platform.processor() or platform.machine()}"
    return f"{cfg.scaling.num_workers} worker(s), {device}"


def _short_list(names: list[str], limit: int = 8) -> str:
    return "[" + ", ".join(names[:limit]) + (f", ... {len(names)} in all]" if len(names) > limit else "]")


def train(
    cfg: Config,
    callbacks: list | None = None,
    restore_from: str | None = None,
    stop_at_step: int | None = None,
    quiet: bool = False,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training run on Ray; returns the summary (metrics, throughput, timings).

    `callbacks` are Ray Train callbacks for the run (Tune's report callback when this is a trial).
    `restore_from` is another run's checkpoint (URI) to start from when this run has none of its own;
    `stop_at_step` pauses the run there with a checkpoint, the LR schedule unchanged (a PBT round).
    `quiet`: this console shows fmdist's own lines and a progress bar, not every worker's output
    (train/console.py); the CLI's default, `--verbose` turns it off.
    `started_at`: when the user's command began (time.time(); the CLI passes its process's start), so
    that time to first step counts the imports and Ray's start; default now.
    """
    launch_time = started_at if started_at is not None else time.time()
    sources = open_data(cfg)
    driver_setup_s = time.time() - launch_time  # imports, config, manifests: before Ray starts
    ray_start_s = ensure_ray(cfg, quiet=quiet)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resuming, own_checkpoint = resume_point(cfg)
    restore_from = own_checkpoint or restore_from
    use_gpu = resolve_use_gpu(cfg)
    shards = len(sources["train"].manifest["shards"])
    if shards < cfg.scaling.num_workers:
        log.warning(
            "data.train %s has %d shard(s) for %d workers, so %d worker(s) get no rows and only keep step; "
            "run fmdist prepare (or write smaller Parquet row groups) for an even split",
            sources["train"].uri, shards, cfg.scaling.num_workers, cfg.scaling.num_workers - shards,
        )  # fmt: skip
    log.info(
        "%s run %s: %s, %d training rows%s%s; %d workers (%s), ZeRO-%d",
        "resuming" if resuming else "starting", run_dir_uri(cfg), cfg.model.task,
        sources["train"].manifest["total_rows"],
        f", {sources['eval'].manifest['total_rows']} eval rows" if "eval" in sources else "",
        f", labels {_short_list(cfg.model.label_names)}" if cfg.model.label_names else "", cfg.scaling.num_workers, "GPU" if use_gpu else "CPU",
        cfg.deepspeed.zero_stage,
    )  # fmt: skip

    write_run_file(cfg, "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    record = {split: provenance(source) for split, source in sources.items()}
    record["hardware"] = hardware(cfg, use_gpu)
    write_run_file(cfg, PROVENANCE_FILE, json.dumps(record, indent=2, default=str))
    env_vars = aws_env() | ({} if use_gpu else {"DS_ACCELERATOR": "cpu"})
    # The drills, and MLflow's address and experiment; MLflow's credentials, like AWS's, come from each
    # node's own environment.
    for name in (FAIL_AT_STEP_ENV, HANG_AT_STEP_ENV, KILL_AT_STEP_ENV, KILL_MID_UPLOAD_ENV, RECORD_ROWS_ENV,
                 watch.MLFLOW_URI_ENV, watch.MLFLOW_EXPERIMENT_ENV):  # fmt: skip
        if name in os.environ:
            env_vars[name] = os.environ[name]
    storage_fs, storage_path = filesystem(cfg.run.storage_path)
    if isinstance(storage_fs, pafs.LocalFileSystem):
        storage_fs = None  # let Ray Train use the plain local path
        storage_path = cfg.run.storage_path
    relay = console.open_relay() if quiet else None
    trainer = TorchTrainer(
        _train_fn_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "train_uri": sources["train"].uri,
            "eval_uri": sources["eval"].uri if "eval" in sources else None,
            "launch_time": launch_time,
            "timings": {"driver_setup_s": driver_setup_s, "ray_start_s": ray_start_s},
            "restore_from": restore_from,
            "stop_at_step": stop_at_step,
            "console": relay.queue if relay is not None else None,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.run.collective_timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
            | ({"GPU": cfg.scaling.gpus_per_worker} if use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env_vars},
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception as exc:  # Ray Train's WorkerGroupError, ControllerError, ...: the run is over
        hint = ""
        if quiet:
            hint = ("\nThe workers' own output is in Ray's logs (/tmp/ray/session_latest/logs/worker-*.err on each "
                    "node, or the Ray dashboard); run again with --verbose to see it on this console.")  # fmt: skip
        raise RuntimeError(failure_message(cfg, exc) + hint) from exc
    finally:
        console.close_relay(relay)
    summary = dict(result.metrics or {})
    summary["checkpoint"] = (
        f"{run_dir_uri(cfg)}/{result.checkpoint.path.rsplit('/', 1)[-1]}" if result.checkpoint else None
    )
    summary["run_dir"] = run_dir_uri(cfg)
    write_run_file(cfg, "metrics.json", json.dumps(summary, indent=2, default=str))
    return summary
