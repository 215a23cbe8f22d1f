"""The fine-tuning loop: a plain function of (config, data, reporter) that any launcher can call.

Ray Train runs `fit` on every worker (train/launch.py), tests run it in-process, and the benchmark
compares it with a bare DeepSpeed loop. Nothing here imports Ray.

Vocabulary: an *iter* is one micro-batch forward/backward on one rank; a *step* is one optimizer
step (gradient_accumulation_steps iters on every rank).

Everything task-specific (model, processor, collate, loss, metrics) comes from the task record,
`fmdist.tasks.get(cfg.model.task)`; checkpoint files are train/checkpoint.py's business.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fmdist import tasks
from fmdist.config import Config, freeze_labels
from fmdist.data.stream import steps_per_epoch, total_steps
from fmdist.eval.metrics import flat_scalars
from fmdist.runtime import (
    FAIL_AT_STEP_ENV,
    HANG_AT_STEP_ENV,
    KILL_AT_STEP_ENV,
    drill_step,
    get_logger,
    use_cpu_accelerator_if_no_gpu,
)
from fmdist.tasks import Rows, Task
from fmdist.train import adapters, checkpoint, distill, flops, privacy, watch
from fmdist.train.ds_config import build_ds_config

_EPOCH_OVER = object()


@dataclass
class LoopIO:
    """Everything the loop needs from its launcher."""

    train_batches: Callable[[int], Iterable[Rows]]
    """epoch -> this rank's micro-batches of raw rows for that epoch, in a deterministic order."""
    iters_per_epoch: Callable[[int], int]
    """epoch -> micro-batches of the busiest rank (the step plan; data/stream.py computes it)."""
    num_train_rows: int
    """Training rows across all ranks (for the log)."""
    report: Callable[[dict[str, Any], str | None], None]
    """Called by every rank at the same points with (metrics, local checkpoint dir or None)."""
    scratch_dir: str
    """Local directory where this rank writes checkpoints before `report` persists them."""
    eval_batches: Callable[[], Iterable[Rows]] | None = None
    """This rank's share of the eval rows; None when there is no eval split."""
    restore_dir: str | None = None
    """A local checkpoint directory to resume from (the launcher finds the latest one)."""
    data_state: Callable[[], dict[str, Any] | None] | None = None
    """This rank's stream position (plain values), saved with each checkpoint."""
    restore_data_state: Callable[[dict[str, Any] | None], None] | None = None
    """Hands a saved stream position back before the first `train_batches` call after a resume."""
    launch_time: float | None = None
    """time.time() when the launcher started, for the time-to-first-step breakdown."""
    timings: dict[str, float] = field(default_factory=dict)
    """Launcher-side timings (e.g. Ray start) to fold into the time-to-first-step breakdown."""
    stop_at_step: int | None = None
    """Pause here (checkpoint and return) without shortening the LR schedule: a PBT round ends here."""
    fingerprint_restore: bool = False
    """After restoring, report a checksum of the restored weights (proves a PBT exploit loaded the donor's)."""
    write_curves: bool = False
    """Rank 0 writes the run directory's tensorboard/ and curves.png, and MLflow metrics when MLFLOW_TRACKING_URI
    is set (train/watch.py). Launched runs do; in-process callers (tests, benchmarks, federated clients) opt in."""
    step_done: Callable[[int, int, float], None] | None = None
    """Rank 0 calls it after every optimizer step with (step, total steps, last logged loss): a progress bar."""
    prepare_model: Callable[[torch.nn.Module], None] | None = None
    """Called with the built model (adapters applied) before DeepSpeed wraps it: a federated client
    loads the global weights into it and adds FedProx's proximal term to its loss (fmdist/federate.py)."""


def _init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join (or, in-process, create) the process group; every group made afterwards waits `timeout_s`.

    Groups made with `new_group` default to torch's 30-minute timeout, not the world group's, and DeepSpeed
    makes its own (a clone of the world group for data parallelism), so they get `timeout_s` too: whichever
    collective a stopped rank leaves waiting fails in time. (In the hang drill, ZeRO-2 on CPU, the world
    group's own timeout fires first; this covers the collectives that run on DeepSpeed's groups.)
    """
    import datetime

    import deepspeed
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        # In-process use (tests, benchmarks): a one-rank group unless the env says otherwise.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _check_same_config_on_all_ranks(cfg: Config, rank: int) -> None:
    """Every rank must train with the same hyperparameters (a Tune trial's sampled values included).

    Collective: all-gathers a digest of the config.
    """
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks were given different configs (digests {digests}); rank {rank} has {digest}.")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (the usual BERT/GPT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    # An empty group is left out: DeepSpeed drops it, and the LR schedule would then have one LR too
    # many (LoRA on GPT-2 trains only matrices). `decays` marks the group that takes train.weight_decay.
    groups = [
        {"params": decay, "weight_decay": weight_decay, "decays": True},
        {"params": no_decay, "weight_decay": 0.0, "decays": False},
    ]
    return [g for g in groups if g["params"]]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if any rank passes True. Collective (all-reduce MAX) and a host-device sync."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _joined(batches: Iterator[Rows | None], device: torch.device) -> Iterator[Rows | None]:
    """Yield this rank's batches, then None while other ranks still have data.

    Ranks own different shares of the rows (whole shards), so they can differ by batches; DeepSpeed
    needs every rank in every forward/backward (ZeRO gathers, gradient all-reduce), so a rank that
    ran out runs a zero-weight placeholder batch instead of hanging or dropping the others' rows.
    A source may itself yield None mid-epoch (one of its slots ran out): also a placeholder.
    """
    while True:
        rows = next(batches, _EPOCH_OVER)
        if not _any_rank(rows is not _EPOCH_OVER, device):
            return
        yield None if rows is _EPOCH_OVER else rows


def iter_seed(seed: int, slot: int, epoch: int, turn: int) -> int:
    """The seed of one micro-batch's randomness (dropout, masked-lm's masking): a function of the slot
    whose rows it trains (data/stream.py) and that slot's turn in the epoch, never of the rank. So a
    resumed run draws exactly what the uninterrupted one would have, and 2 workers x accumulation 1
    draw what 1 worker x accumulation 2 draws, which makes a resume on another worker count exact."""
    digest = hashlib.sha256(f"{seed}:{slot}:{epoch}:{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The collated tensors the model takes, on the device (a task's `stats/` counters stay behind)."""
    return {k: v.to(device) for k, v in batch.items() if not k.startswith("stats/")}


STEP_KEY = "fmdist/step"
"""Rendezvous-store key prefix (then /RANK): the optimizer step each rank is in, for naming a hung rank."""


def _step_store(world_size: int) -> Any:
    """The process group's rendezvous store (a TCPStore every rank reaches), or None with one rank."""
    if world_size < 2:
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):  # private in torch; without it the error names no rank
        return None


def _timed_out(exc: BaseException) -> bool:
    """A collective that waited past the process group's timeout: gloo's 'Timed out waiting ...ms for
    recv' or NCCL's watchdog 'collective operation timeout'. Only these: an S3 read that timed out is
    the data's error, not a stopped rank, and keeps its own message."""
    text = str(exc).lower()
    return "timed out waiting" in text or "collective operation timeout" in text


def _hang_message(rank: int, world_size: int, step: int, timeout_s: int, store: Any) -> str:
    """Which rank stopped taking part, after `step` (this rank's last finished step): the one(s) whose
    noted step is behind the others'."""
    steps: dict[int, int] = {}
    for other in range(world_size):
        key = f"{STEP_KEY}/{other}"
        try:
            if store is not None and store.check([key]):
                steps[other] = int(store.get(key))
        except (RuntimeError, ValueError):
            pass
    where = ""
    if len(steps) == world_size and len(set(steps.values())) > 1:
        ahead = max(steps.values())
        behind = {r: s for r, s in steps.items() if s < ahead}
        where = (
            " waiting for " + ", ".join(f"rank {r} (last entered step {s})" for r, s in sorted(behind.items()))
            + f"; the other ranks entered step {ahead}. That rank stopped taking part: stuck in a collective, "
            "in a data read, or its process froze. Look at its log"
        )  # fmt: skip
    elif steps:
        where = (
            f" (steps the ranks are in: {steps}); a rank stopped taking part or is that slow. Look at the ranks' logs"
        )
    return (
        f"rank {rank}: a collective after step {step} timed out after {timeout_s} s (run.collective_timeout_s){where}. "
        "If that rank's steps are legitimately this slow (a large checkpoint to S3), raise run.collective_timeout_s."
    )


def average_buffers(module: torch.nn.Module) -> None:
    """Make floating-point buffers (BatchNorm's running mean and variance) equal on every rank.

    DeepSpeed keeps parameters in step across ranks but not buffers: each rank's BatchNorm tracks
    statistics of its own rows. Evaluation (each rank scores its share) and the saved checkpoint
    (rank 0's buffers) must use one model, so the ranks' statistics are averaged first. Constant
    buffers average to themselves. Collective: one all-reduce per floating-point buffer.
    """
    world_size = dist.get_world_size()
    if world_size == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer.data)
            buffer.data /= world_size


def evaluate(engine: Any, cfg: Config, task: Task, processor: Any, batches: Iterable[Rows]) -> dict[str, Any]:
    """The task's metrics over every rank's share of the eval rows (summed counts, not rank 0's share)."""
    device = engine.device
    average_buffers(engine.module)
    counts = torch.zeros(task.counts_size(cfg), dtype=torch.float64, device=device)
    placeholder = task.placeholder(cfg)
    engine.eval()
    with torch.no_grad():
        for rows in _joined(iter(batches), device):
            collated = task.collate(rows or placeholder, processor, cfg)
            batch = model_inputs(collated, device)
            out = engine(**batch)
            if rows is not None:
                task.count(counts, out, {**collated, **batch}, cfg)
    # Collective: sum the counts over ranks (one all-reduce); every metric is derived from them.
    dist.all_reduce(counts)
    engine.train()
    return task.finalize(counts.tolist(), cfg)


def describe(metrics: dict[str, Any]) -> str:
    """One line for the log: loss, the headline metric, the other scalars' first few."""
    headline = metrics["headline"]
    others = [k for k in metrics["scalars"] if k not in ("loss", headline) and not k.startswith("f1_")][:2]
    parts = [f"loss {metrics['loss']:.4f}", f"{headline} {metrics[headline]:.4f}"]
    parts += [f"{k} {metrics['scalars'][k]:.4f}" for k in others]
    return ", ".join(parts) + f" ({metrics['num_examples']} examples)"


def apply_hyperparameters(engine: Any, scheduler: Any, cfg: Config, log: Any) -> None:
    """Make the restored optimizer and LR schedule follow this run's `train.lr` and `train.weight_decay`.

    A checkpoint carries the optimizer's param groups and the scheduler's base LRs. For a plain resume
    they equal the config; after a PBT exploit the config holds perturbed values, and the schedule
    continues at the restored step with the new peak LR.
    """
    groups = scheduler.optimizer.param_groups
    decaying = [g for g in groups if g.get("decays")]
    old_lr = scheduler.base_lrs[0]
    old_wd = decaying[0]["weight_decay"] if decaying else cfg.train.weight_decay
    if (old_lr, old_wd) == (cfg.train.lr, cfg.train.weight_decay):
        return
    scheduler.base_lrs = [cfg.train.lr] * len(groups)
    for group, lr_lambda in zip(groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = cfg.train.lr * lr_lambda(scheduler.last_epoch)
    for group in decaying:  # biases and norms never decay
        group["weight_decay"] = cfg.train.weight_decay
    log.info(
        "hyperparameters differ from the checkpoint's: lr %.3g -> %.3g, weight_decay %.3g -> %.3g; "
        "the schedule continues from step %d",
        old_lr, cfg.train.lr, old_wd, cfg.train.weight_decay, scheduler.last_epoch,
    )  # fmt: skip


def weights_checksum(engine: Any) -> dict[str, float]:
    """Sum and sum of squares of every trainable fp32 weight, gathered across ZeRO partitions.

    Collective under ZeRO (each parameter is assembled from every rank's fragment); every rank gets
    the same numbers. Comparable with the same sums over a consolidated checkpoint.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    total = torch.zeros(2, dtype=torch.float64)
    for param in engine.module.parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        full = (param.data if full is None else full).detach().double().cpu()
        total += torch.stack([full.sum(), (full * full).sum()])
    return {"sum": total[0].item(), "sum_sq": total[1].item()}


@dataclass
class Progress:
    """Where the run stands: step, epoch and iter are saved in every checkpoint (DeepSpeed client state)."""

    step: int = 0
    epoch: int = 0
    iters_in_epoch: int = 0
    eval_metrics: dict[str, Any] | None = None
    """The latest evaluation (written into checkpoints' metadata, returned at the end)."""


@dataclass
class Window:
    """Training counters since the last log line, kept on the device (read once per log line)."""

    sums: torch.Tensor
    """loss sum, real iters, rows, tokens (or pixels' images), then a task's `stats/` counters."""
    stat_names: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def fit(cfg: Config, io: LoopIO) -> dict[str, Any]:
    """Fine-tune per `cfg` on this rank; returns the final metrics (same on every rank)."""
    use_cpu_accelerator_if_no_gpu()  # before DeepSpeed's first use (callers without Ray included)
    import deepspeed
    from transformers import get_scheduler

    # ---- set-up: process group, model, processor, optimizer, DeepSpeed engine, restore
    # Start-up phases, contiguous, so that they add up to time_to_first_step_s: the launcher's (driver
    # set-up, Ray start), the worker group (launch to this call, by wall clock), then this rank's own.
    timings = dict(io.timings)
    if io.launch_time is not None:
        timings["worker_group_s"] = time.time() - io.launch_time - sum(io.timings.values())
    phase_start = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - phase_start[0]
        phase_start[0] = now

    rank, world_size = _init_distributed(cfg.run.collective_timeout_s)
    log = get_logger("fmdist.train", rank)
    sinks = watch.open_watch(cfg, rank, io.scratch_dir) if io.write_curves else None  # rank 0's curves
    _check_same_config_on_all_ranks(cfg, rank)
    task = tasks.get(cfg.model.task)
    if task.labelled:
        freeze_labels(cfg, None)  # a launcher has frozen them already; in-process callers may give num_labels only
    if privacy.enabled(cfg):
        io = privacy.with_poisson_plan(cfg, io)  # an epoch: rows / global batch Poisson steps
    num_steps = total_steps(cfg, io.iters_per_epoch)
    phase("process_group_s")

    teacher = None
    if distill.enabled(cfg):
        teacher = distill.load_teacher(distill.teacher_dir(cfg, io.scratch_dir), _auto_class(task))
    _seed_everything(cfg.train.seed)  # after the teacher: the student's initial weights depend on the seed alone
    if teacher is not None and cfg.distill.init_from_teacher:
        model = distill.build_student(cfg, teacher)
        copied = distill.init_from_teacher(model, teacher)
        log.info("student initialised from the teacher: layers %s (%d tensors copied)", copied["from_layers"],
                 copied["copied"])  # fmt: skip
    else:
        model = task.build_model(cfg)
    processor = task.load_processor(cfg.model.tokenizer or cfg.model.name_or_path)
    if cfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if adapters.enabled(cfg):
        model = adapters.apply(model, cfg, total_steps=num_steps)
    if io.prepare_model is not None:
        io.prepare_model(model)
    # DP-SGD: embeddings frozen, Opacus's per-sample hooks attached, sigma settled (train/privacy.py).
    dp = privacy.setup(model, cfg, io.num_train_rows, num_steps, rank, world_size) if privacy.enabled(cfg) else None
    trainable, total = adapters.parameter_counts(model)
    mfu_of = mfu_meter(model, world_size, torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    phase("model_load_s")

    # Fused on CUDA: one kernel per parameter group (ZeRO hands AdamW flat fp32 partitions) instead of
    # foreach's chain of elementwise passes over them, as bench/mfu.py's bare loops step. Not with
    # optimizer offload (those partitions live on the CPU) and not on CPU: torch's default there.
    fused = torch.cuda.is_available() and cfg.deepspeed.offload_optimizer == "none"
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, fused=True if fused else None
    )
    scheduler = get_scheduler(
        {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.lr_schedule],
        optimizer,
        num_warmup_steps=int(cfg.train.warmup_ratio * num_steps),
        num_training_steps=num_steps,
    )
    ds_config = build_ds_config(cfg, world_size, torch.cuda.is_available())
    if io.restore_dir is not None and checkpoint.needs_universal(io.restore_dir, world_size):
        ds_config["checkpoint"] = {"load_universal": True}  # another worker count: checkpoint.load re-cuts ZeRO
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    phase("deepspeed_init_s")  # the optimizer, the LR schedule and the engine
    # from_pretrained returns a model in eval mode and DeepSpeed keeps it so: without this, dropout
    # stays off until the first evaluation switches the mode back.
    engine.train()
    device = engine.device
    if teacher is not None:
        teacher.to(device)

    progress = Progress()
    restored: dict[str, Any] = {}  # reported with every event of this run
    if io.restore_dir is not None:
        client_state, data_state = checkpoint.load(engine, io.restore_dir)
        progress = Progress(client_state["step"], client_state["epoch"], client_state["iters_in_epoch"])
        if io.restore_data_state is not None:
            # Under DP the epoch's whole share is re-read: Poisson steps are independent, none is replayed.
            io.restore_data_state(None if dp is not None else data_state)
        apply_hyperparameters(engine, scheduler, cfg, log)
        log.info("resumed from %s at step %d (epoch %d, iter %d)", io.restore_dir, progress.step,
                 progress.epoch + 1, progress.iters_in_epoch)  # fmt: skip
        restored["restore/step"] = progress.step
        if io.fingerprint_restore:
            checksum = weights_checksum(engine)
            restored.update({"restore/weights_sum": checksum["sum"], "restore/weights_sum_sq": checksum["sum_sq"]})
    end_step = num_steps if io.stop_at_step is None else min(num_steps, io.stop_at_step)
    log.info(
        "training %s (%s%s) on %d worker(s): %d steps (%d per epoch), global batch %d = %d micro x %d "
        "accumulation x %d workers, ZeRO-%d, %s, %d training rows",
        cfg.model.name_or_path, task.name, f", {cfg.model.num_labels} labels" if task.labelled else "", world_size,
        num_steps,
        steps_per_epoch(io.iters_per_epoch(0), cfg.train.gradient_accumulation_steps), cfg.global_batch_size,
        cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, world_size, cfg.deepspeed.zero_stage,
        cfg.deepspeed.precision, io.num_train_rows,
    )  # fmt: skip
    if dp is not None:
        log.info("DP-SGD: noise multiplier %.4g, per-sample clipping norm %g, Poisson sample rate %.5g, %d steps, "
                 "delta %.3g: epsilon %.4g at the end (%s accountant)", dp.plan.noise_multiplier,
                 dp.plan.max_grad_norm, dp.plan.sample_rate, num_steps, dp.plan.delta,
                 privacy.spent_epsilon(dp.plan, num_steps), dp.plan.accountant)  # fmt: skip
    if progress.step >= end_step:
        log.info("checkpoint is already at step %d of %d; nothing to train", progress.step, end_step)
    elif end_step < num_steps:
        log.info("this run pauses at step %d of %d (checkpointed; the LR schedule spans all %d)", end_step,
                 num_steps, num_steps)  # fmt: skip

    def checkpoint_and_report(event: dict[str, Any], save: bool) -> None:
        """Every rank: save its part of a checkpoint (collective) when asked, then report the event."""
        path = None
        if save:
            average_buffers(engine.module)
            path = checkpoint.save(
                engine,
                f"{io.scratch_dir}/step_{progress.step:08d}",
                {"step": progress.step, "epoch": progress.epoch, "iters_in_epoch": progress.iters_in_epoch},
                {
                    "zero_stage": cfg.deepspeed.zero_stage,
                    "world_size": world_size,
                    "config": cfg.to_dict(),
                    "eval": progress.eval_metrics,
                    "privacy": privacy.record(dp.plan, progress.step) if dp is not None else None,
                },  # fmt: skip
                processor,
                io.data_state() if io.data_state is not None else None,
            )
            watch.sync(sinks)  # a remote run directory gets the curves so far with each checkpoint
        spent = privacy.metrics(dp.plan, progress.step) if dp is not None else {}
        watch.record(sinks, progress.step, spent)  # privacy/epsilon as a curve too
        io.report({"step": progress.step, "epoch": progress.epoch, **restored, **spent, **event}, path)

    def evaluate_and_report(save: bool, train_loss: float, extra: dict[str, Any] | None = None) -> None:
        scalars: dict[str, Any] = {"train/loss": train_loss, **(extra or {})}
        if io.eval_batches is not None:
            progress.eval_metrics = evaluate(engine, cfg, task, processor, io.eval_batches())
            eval_scalars = flat_scalars(progress.eval_metrics, "eval")
            scalars.update(eval_scalars, eval=progress.eval_metrics)
            watch.record(sinks, progress.step, eval_scalars)
            log.info("eval at step %d: %s", progress.step, describe(progress.eval_metrics))
        checkpoint_and_report(scalars, save)

    def training_loss(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's loss, or with a teacher the distillation loss (the teacher's forward is not trained)."""
        if teacher is None:
            return task.loss(engine(**batch), batch)
        hidden = cfg.distill.hidden_mse_weight > 0
        out = engine(**batch, output_hidden_states=hidden)
        with torch.no_grad():
            teacher_out = teacher(**batch, output_hidden_states=hidden)
        return distill.distillation_loss(
            out, teacher_out, batch["labels"], task.name, cfg.distill.alpha, cfg.distill.temperature,
            cfg.distill.hidden_mse_weight, batch.get("attention_mask"), student_loss=task.loss(out, batch),
        )  # fmt: skip

    # ---- training: epochs of micro-batches, an optimizer step every `accum` iters on every rank
    placeholder = task.placeholder(cfg)
    fail_at_step = int(os.environ.get(FAIL_AT_STEP_ENV, 0)) if io.restore_dir is None else None
    accum = cfg.train.gradient_accumulation_steps
    checkpoint_every = cfg.run.checkpoint_every_steps
    # Every rank sizes the window alike (an all-reduce needs equal shapes), from the task's counters.
    stat_names = [k.removeprefix("stats/") for k in task.collate(placeholder, processor, cfg) if k.startswith("stats/")]
    window = Window(torch.zeros(4 + len(stat_names), dtype=torch.float64, device=device), stat_names)
    stats_total: dict[str, float] = {}
    phase("restore_s")  # a resume's checkpoint load; otherwise next to nothing
    train_start = time.perf_counter()
    start_step = progress.step
    last_train_loss = first_train_loss = float("nan")
    first_step_end = train_start

    # A rank that stops taking part makes the others' next collective time out (run.collective_timeout_s):
    # each rank notes the step it enters in the rendezvous store, so the error can name the one behind.
    store = _step_store(world_size)
    hang_at = drill_step(HANG_AT_STEP_ENV, rank)
    kill_at = drill_step(KILL_AT_STEP_ENV, rank) if io.restore_dir is None else None
    if store is not None:
        store.set(f"{STEP_KEY}/{rank}", str(progress.step + 1))
    try:
        # With `epochs`, stop after the last epoch; with `max_steps`, run as many epochs as it takes.
        while progress.step < end_step and (cfg.train.max_steps is not None or progress.epoch < cfg.train.epochs):
            batches = io.train_batches(progress.epoch)
            if dp is not None:  # Poisson-sampled steps from this rank's share of the epoch's rows
                steps = steps_per_epoch(io.iters_per_epoch(progress.epoch), accum)
                batches = privacy.poisson_batches(
                    dp, batches, progress.epoch, progress.iters_in_epoch // accum, steps, accum
                )
            epoch_iters = _joined(iter(batches), device)
            while progress.step < end_step:
                rows = next(epoch_iters, _EPOCH_OVER)
                if rows is _EPOCH_OVER:
                    if progress.iters_in_epoch % accum == 0:
                        break  # every rank is out of data and no accumulation is pending
                    rows = None  # finish the pending accumulation with placeholders, so epochs end on a step
                # A rank out of data (or the epoch's last, partial accumulation) runs a zero-weight
                # placeholder so that every rank takes part in every collective and every step.
                turn, j = divmod(progress.iters_in_epoch, accum)
                seed = iter_seed(cfg.train.seed, rank * accum + j, progress.epoch, turn)
                torch.manual_seed(seed)  # dropout; placeholders run in eval mode and draw nothing
                collated = task.collate(rows or placeholder, processor, cfg, seed)
                batch = model_inputs(collated, device)
                if rows is None:
                    # Eval mode: the placeholder leaves no trace (no BatchNorm statistics, no dropout RNG draws).
                    engine.module.eval()
                    loss = training_loss(engine, batch) * 0.0
                    engine.module.train()
                else:
                    loss = training_loss(engine, batch)
                    _add_to_window(window, loss, batch, collated)
                if dp is None:
                    engine.backward(loss)
                elif rows is not None:
                    privacy.backward(dp, engine, loss)  # per-sample clipping on this rank; no collective
                if (progress.iters_in_epoch + 1) % accum == 0:
                    if dp is not None:
                        privacy.finish_step(dp, engine, progress.step)  # noise share, then the one all-reduce
                    # AdaLoRA's rank allocation reads this step's gradients, which engine.step() clears.
                    adapters.after_step(engine.module, progress.step + 1)
                engine.step()  # DeepSpeed applies the optimizer only at accumulation boundaries
                progress.iters_in_epoch += 1
                if progress.iters_in_epoch % accum:
                    continue
                progress.step += 1
                if fail_at_step == progress.step:
                    raise RuntimeError(
                        f"{FAIL_AT_STEP_ENV}={progress.step}: injected failure after step {progress.step}"
                    )
                if kill_at == progress.step:
                    log.warning("%s: rank %d kills its own process after step %d (a drill)", KILL_AT_STEP_ENV, rank,
                                progress.step)  # fmt: skip
                    os.kill(os.getpid(), signal.SIGKILL)
                if hang_at == progress.step:
                    log.warning("%s: rank %d stops taking part after step %d (a drill)", HANG_AT_STEP_ENV, rank,
                                progress.step)  # fmt: skip
                    while True:
                        time.sleep(60)
                if store is not None:
                    store.set(f"{STEP_KEY}/{rank}", str(progress.step + 1))  # the step this rank enters next
                if progress.step == start_step + 1:
                    first_step_end = time.perf_counter()
                    phase("first_step_s")
                    timings["time_to_first_step_s"] = sum(timings.values())
                if progress.step % cfg.train.log_every_steps == 0 or progress.step == end_step:
                    logged = _log_window(window, log, progress, num_steps, end_step, engine, start_step,
                                         train_start, stats_total, mfu_of)  # fmt: skip
                    watch.record(sinks, progress.step, logged)
                    last_train_loss = logged["train/loss"]
                    if math.isnan(first_train_loss):
                        first_train_loss = last_train_loss
                if io.step_done is not None and rank == 0:
                    io.step_done(progress.step, num_steps, last_train_loss)
                do_eval = cfg.train.eval_every_steps is not None and progress.step % cfg.train.eval_every_steps == 0
                do_ckpt = checkpoint_every is not None and progress.step % checkpoint_every == 0
                if progress.step < end_step and do_eval:
                    evaluate_and_report(do_ckpt or checkpoint_every is None, last_train_loss)
                elif progress.step < end_step and do_ckpt:
                    checkpoint_and_report({"train/loss": last_train_loss}, save=True)
            if progress.step >= end_step:
                break
            progress.epoch += 1
            progress.iters_in_epoch = 0
            if cfg.train.eval_every_steps is None and progress.step < end_step:
                evaluate_and_report(checkpoint_every is None, last_train_loss)
    except RuntimeError as exc:
        if not _timed_out(exc):
            raise
        raise RuntimeError(_hang_message(rank, world_size, progress.step, cfg.run.collective_timeout_s, store)) from exc

    # ---- summary: throughput, start-up timings, a last evaluation and checkpoint
    now = time.perf_counter()
    train_time = now - train_start
    samples = (progress.step - start_step) * cfg.global_batch_size
    # Throughput after the first step: start-up (first batch, lazy inits) is reported in timings.
    steady = (
        (progress.step - start_step - 1) * cfg.global_batch_size / (now - first_step_end)
        if progress.step - start_step > 1
        else float("nan")
    )
    summary = {
        "train/first_loss": first_train_loss,
        "train/time_s": train_time,
        "train/samples_per_s": samples / train_time if train_time > 0 else float("nan"),
        "train/steady_samples_per_s": steady,
        "timings": timings,
        **{f"train/{name}": value for name, value in stats_total.items()},
        **(privacy.metrics(dp.plan, progress.step) if dp is not None else {}),
    }
    if dp is not None:
        log.info("privacy spent: epsilon %.4g at delta %.3g after %d steps (noise multiplier %.4g, sample rate %.5g)",
                 summary["privacy/epsilon"], dp.plan.delta, progress.step, dp.plan.noise_multiplier,
                 dp.plan.sample_rate)  # fmt: skip
    log.info("finished %d steps in %s (%.1f samples/s)", progress.step, _fmt_duration(train_time),
             summary["train/samples_per_s"])  # fmt: skip
    if stats_total.get("words_cut"):
        log.warning(
            "truncation at data.max_length=%d cut %d of %d words in training (their tags were not learned); "
            "raise data.max_length to keep them", cfg.data.max_length, stats_total["words_cut"], stats_total["words"],
        )  # fmt: skip
    # The final report carries the whole summary, so the driver has it wherever rank 0 ran.
    evaluate_and_report(True, last_train_loss, summary)
    watch.close(sinks)  # curves.png, and the event files' last copy
    return {"step": progress.step, "train/loss": last_train_loss, "eval": progress.eval_metrics, **summary}


def mfu_meter(
    model: torch.nn.Module, world_size: int, device_name: str | None
) -> Callable[[float, float], float | None] | None:
    """(tokens/s over all ranks, tokens per row) -> model FLOPs utilization, on GPUs of known peak (train/flops.py).

    One GPU per rank. The sequence length in the attention term is the window's mean tokens per row: the
    packed block for packed language modelling, the unpadded length otherwise (padding is not model FLOPs).
    None without a GPU, or for a GPU whose peak is not in the table (MFU is then not logged).
    """
    peak = flops.peak_flops(device_name) if device_name else None
    if peak is None:
        return None
    n_params = flops.count_parameters(model)  # before DeepSpeed partitions anything

    def mfu(tokens_per_s: float, tokens_per_row: float) -> float | None:
        per_token = flops.flops_per_token(model, max(1, round(tokens_per_row)), n_params=n_params)
        return flops.model_flops_utilization(per_token, tokens_per_s, peak * world_size)

    return mfu


def _auto_class(task: Task) -> Any:
    import transformers

    return getattr(transformers, task.export_class)


def _add_to_window(window: Window, loss: torch.Tensor, batch: dict[str, torch.Tensor], collated: dict) -> None:
    """Add one real micro-batch to the window, on the device (no host sync)."""
    stats = {k.removeprefix("stats/"): v for k, v in collated.items() if k.startswith("stats/")}
    sizes = batch["attention_mask"].sum() if "attention_mask" in batch else loss.new_tensor(0.0)
    window.sums += torch.stack(
        [loss.detach().double(), loss.new_tensor(1.0, dtype=torch.float64),
         loss.new_tensor(len(batch["labels"]), dtype=torch.float64), sizes.double(),
         *(stats[name].to(window.sums) for name in window.stat_names)]
    )  # fmt: skip


def _log_window(
    window: Window,
    log: Any,
    progress: Progress,
    num_steps: int,
    end_step: int,
    engine: Any,
    start_step: int,
    train_start: float,
    stats_total: dict[str, float],
    mfu_of: Callable[[float, float], float | None] | None = None,
) -> dict[str, float]:
    """One log line (rank 0) from the window, summed over ranks; returns its scalars (train/loss, ...).

    Collective (all-reduce) and a host sync: the only ones per log line.
    """
    dist.all_reduce(window.sums)
    loss_sum, n_iters, n_rows, n_tokens, *stats = window.sums.tolist()
    elapsed = time.perf_counter() - window.started
    for name, value in zip(window.stat_names, stats, strict=True):
        stats_total[name] = stats_total.get(name, 0.0) + value
    train_loss = loss_sum / max(n_iters, 1)
    rate = (progress.step - start_step) / (time.perf_counter() - train_start)
    tokens = f" | {n_tokens / elapsed:.0f} tokens/s" if n_tokens else ""
    scalars = {"train/loss": train_loss, "train/lr": engine.get_lr()[0], "train/samples_per_s": n_rows / elapsed}
    if n_tokens:
        scalars["train/tokens_per_s"] = n_tokens / elapsed
        mfu = mfu_of(n_tokens / elapsed, n_tokens / max(n_rows, 1)) if mfu_of is not None else None
        if mfu is not None:
            scalars["train/mfu"] = mfu
            tokens += f" | MFU {100 * mfu:.1f}%"
    log.info(
        "step %d/%d (%.1f%%) | epoch %d | loss %.4f | lr %.2e | %.1f samples/s%s | ETA %s",
        progress.step, num_steps, 100 * progress.step / num_steps, progress.epoch + 1, train_loss,
        scalars["train/lr"], scalars["train/samples_per_s"], tokens,
        _fmt_duration((end_step - progress.step) / rate),
    )  # fmt: skip
    window.sums.zero_()
    window.started = time.perf_counter()
    return scalars
