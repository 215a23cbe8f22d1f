"""The fine-tuning loop: a plain function of (config, data, reporter) that any launcher can call.

Ray Train runs `fit` on every worker (train/launch.py), tests run it in-process, and the benchmark
compares it with a bare DeepSpeed loop. Nothing here imports Ray.

Vocabulary: an *iter* is one micro-batch forward/backward on one rank; a *step* is one optimizer
step (gradient_accumulation_steps iters on every rank).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fmdist.config import Config
from fmdist.eval.metrics import classification_metrics, flat_scalars
from fmdist.runtime import get_logger
from fmdist.tasks import sequence_classification as task
from fmdist.train.ds_config import build_ds_config

Rows = dict[str, Any]
"""One micro-batch of raw columns (column name -> sequence of values), before tokenization."""

DS_TAG = "ds"
STATE_FILE = "fmdist_state.json"
_EPOCH_OVER = object()
FAIL_AT_STEP_ENV = "FMDIST_FAIL_AT_STEP"
"""Fault injection for recovery tests and drills: a fresh (not resumed) run raises after this step."""
HF_DIR = "hf"


@dataclass
class LoopIO:
    """Everything the loop needs from its launcher."""

    train_batches: Callable[[int], Iterable[Rows]]
    """epoch -> this rank's micro-batches of raw rows for that epoch, in a deterministic order."""
    num_train_rows: int
    """Training rows across all ranks, for the step count, LR schedule and ETA."""
    report: Callable[[dict[str, Any], str | None], None]
    """Called by every rank at the same points with (metrics, local checkpoint dir or None)."""
    scratch_dir: str
    """Local directory where this rank writes checkpoints before `report` persists them."""
    eval_batches: Callable[[], Iterable[Rows]] | None = None
    """This rank's share of the eval rows; None when there is no eval split."""
    restore_dir: str | None = None
    """A local checkpoint directory to resume from (the launcher finds the latest one)."""
    iters_per_epoch: Callable[[int], int] | None = None
    """epoch -> micro-batches of the busiest rank, when the source knows it exactly (else estimated)."""
    data_state: Callable[[], Any] | None = None
    """This rank's stream position, saved with each checkpoint (a resumable stream provides it)."""
    restore_data_state: Callable[[Any], None] | None = None
    """Hands a saved stream position back before the first `train_batches` call after a resume."""
    launch_time: float | None = None
    """time.time() when the launcher started, for the time-to-first-step breakdown."""
    timings: dict[str, float] = field(default_factory=dict)
    """Launcher-side timings (e.g. Ray start) to fold into the time-to-first-step breakdown."""
    stop_at_step: int | None = None
    """Pause here (checkpoint and return) without shortening the LR schedule: a PBT round ends here."""
    fingerprint_restore: bool = False
    """After restoring, report a checksum of the restored weights (proves a PBT exploit loaded the donor's)."""


def _init_distributed() -> tuple[int, int]:
    import deepspeed

    if not dist.is_initialized():
        # In-process use (tests, benchmarks): a one-rank group unless the env says otherwise.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
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
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def steps_per_epoch(cfg: Config, io: LoopIO, world_size: int, epoch: int) -> int:
    """Optimizer steps in one epoch: every rank runs as many iters as the busiest one (the loop joins
    ranks), and an epoch's last, partial accumulation is completed with placeholders."""
    if io.iters_per_epoch is not None:
        iters = io.iters_per_epoch(epoch)
    else:
        # Ray Data deals micro-batch blocks round-robin: the first rank gets the odd one out.
        iters = math.ceil(math.ceil(io.num_train_rows / cfg.train.micro_batch_size) / world_size)
    return max(1, math.ceil(iters / cfg.train.gradient_accumulation_steps))


def total_steps(cfg: Config, io: LoopIO, world_size: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return sum(steps_per_epoch(cfg, io, world_size, epoch) for epoch in range(cfg.train.epochs))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if any rank passes True. Collective (all-reduce MAX) and a host-device sync."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _joined(batches: Iterator[Rows], device: torch.device) -> Iterator[Rows | None]:
    """Yield this rank's batches, then None while other ranks still have data.

    Ray Data splits rows between ranks without dropping any, so ranks can differ by a batch; DeepSpeed
    needs every rank in every forward/backward (ZeRO gathers, gradient all-reduce), so a rank that
    ran out runs a zero-weight placeholder batch instead of hanging or dropping the others' rows.
    """
    while True:
        rows = next(batches, None)
        if not _any_rank(rows is not None, device):
            return
        yield rows


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def evaluate(engine: Any, cfg: Config, tokenizer: Any, batches: Iterable[Rows]) -> dict[str, Any]:
    """Metrics over every rank's share of the eval rows (gathered counts, not rank 0's share)."""
    device = engine.device
    n = cfg.model.num_labels
    confusion = torch.zeros(n, n, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    placeholder = _placeholder_rows(cfg)
    engine.eval()
    with torch.no_grad():
        for rows in _joined(iter(batches), device):
            batch = task.collate(rows or placeholder, tokenizer, cfg.data, n)
            out = engine(**{k: v.to(device) for k, v in batch.items()})
            if rows is not None:
                labels = batch["labels"].to(device)
                loss_sum += out.loss.double() * labels.numel()
                task.confusion_update(confusion, out.logits, labels)
    # Collective: sum the counts over ranks; every metric is derived from these.
    dist.all_reduce(confusion)
    dist.all_reduce(loss_sum)
    engine.train()
    return classification_metrics(confusion.tolist(), loss_sum.item(), cfg.model.label_names)


def _placeholder_rows(cfg: Config) -> Rows:
    return {cfg.data.text_column: [""], cfg.data.label_column: [0]}


def save_checkpoint(
    engine: Any, io: LoopIO, cfg: Config, tokenizer: Any, state: dict[str, Any], eval_metrics: dict[str, Any] | None
) -> str:
    """Every rank writes its DeepSpeed shard (collective), its RNG state, and rank 0 the metadata."""
    rank = dist.get_rank()
    path = Path(io.scratch_dir) / f"step_{state['step']:08d}"
    # Collective: DeepSpeed barriers inside; each rank writes only its own shard files.
    engine.save_checkpoint(str(path), tag=DS_TAG, client_state=state)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng_rank{rank}.pt")
    if io.data_state is not None:
        torch.save(io.data_state(), path / f"data_rank{rank}.pt")
    if rank == 0:
        meta = {**state, "zero_stage": cfg.deepspeed.zero_stage, "world_size": dist.get_world_size()}
        meta.update(config=cfg.to_dict(), eval=eval_metrics)
        (path / STATE_FILE).write_text(json.dumps(meta, indent=2))
        engine.module.config.save_pretrained(path / HF_DIR)
        tokenizer.save_pretrained(path / HF_DIR)
    return str(path)


def load_checkpoint(engine: Any, path: str, io: LoopIO) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG and stream state; a missing or unreadable shard is an error.

    The returned client state has `data_restored`: whether the stream continues from its saved
    position (no replay) or the loop must skip the epoch's consumed batches itself.
    """
    rank = dist.get_rank()
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise RuntimeError(f"checkpoint {path} has no {STATE_FILE}; it is incomplete. Delete it to use an older one.")
    meta = json.loads(state_file.read_text())
    if meta["world_size"] != dist.get_world_size() and meta["zero_stage"] > 0:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta['world_size']} ZeRO-{meta['zero_stage']} workers but this run "
            f"has {dist.get_world_size()}; set scaling.num_workers={meta['world_size']} to resume it."
        )
    try:
        load_path, client_state = engine.load_checkpoint(
            path, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except (OSError, RuntimeError, KeyError, EOFError) as exc:
        raise RuntimeError(f"checkpoint {path} could not be read on rank {rank}: {exc}") from exc
    if load_path is None:
        raise RuntimeError(
            f"checkpoint {path} could not be read on rank {rank}: DeepSpeed found no shard for tag {DS_TAG}."
        )
    rng_file = Path(path) / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise RuntimeError(f"checkpoint {path} is missing {rng_file.name}; it is incomplete.")
    rng = torch.load(rng_file, weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    data_file = Path(path) / f"data_rank{rank}.pt"
    client_state["data_restored"] = io.restore_data_state is not None and data_file.is_file()
    if client_state["data_restored"]:
        io.restore_data_state(torch.load(data_file, weights_only=False))
    return client_state


def apply_hyperparameters(engine: Any, scheduler: Any, cfg: Config, log: Any) -> None:
    """Make the restored optimizer and LR schedule follow this run's `train.lr` and `train.weight_decay`.

    A checkpoint carries the optimizer's param groups and the scheduler's base LRs. For a plain resume
    they equal the config; after a PBT exploit the config holds perturbed values, and the schedule
    continues at the restored step with the new peak LR.
    """
    groups = scheduler.optimizer.param_groups
    old_lr, old_wd = scheduler.base_lrs[0], groups[0]["weight_decay"]
    if (old_lr, old_wd) == (cfg.train.lr, cfg.train.weight_decay):
        return
    scheduler.base_lrs = [cfg.train.lr] * len(groups)
    for group, lr_lambda in zip(groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = cfg.train.lr * lr_lambda(scheduler.last_epoch)
    groups[0]["weight_decay"] = cfg.train.weight_decay  # group 1 (biases, norms) never decays
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


def fit(cfg: Config, io: LoopIO) -> dict[str, Any]:
    """Fine-tune per `cfg` on this rank; returns the final metrics (same on every rank)."""
    import deepspeed
    from transformers import get_scheduler

    t_enter = time.perf_counter()
    timings = dict(io.timings)
    if io.launch_time is not None:
        timings["worker_group_s"] = time.time() - io.launch_time - sum(io.timings.values())
    rank, world_size = _init_distributed()
    log = get_logger("fmdist.train", rank)
    _check_same_config_on_all_ranks(cfg, rank)
    on_gpu = torch.cuda.is_available()

    _seed_everything(cfg.train.seed)
    t0 = time.perf_counter()
    model = task.build_model(cfg.model)
    tokenizer = task.load_tokenizer(cfg.model)
    if cfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    timings["model_load_s"] = time.perf_counter() - t0

    num_steps = total_steps(cfg, io, world_size)
    per_epoch = steps_per_epoch(cfg, io, world_size, 0)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    scheduler = get_scheduler(
        {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.lr_schedule],
        optimizer,
        num_warmup_steps=int(cfg.train.warmup_ratio * num_steps),
        num_training_steps=num_steps,
    )
    t0 = time.perf_counter()
    ds_config = build_ds_config(cfg, world_size, on_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    timings["deepspeed_init_s"] = time.perf_counter() - t0
    device = engine.device

    step, epoch, iters_done = 0, 0, 0
    skip_iters = 0  # batches to read and discard on resume when the data source cannot seek
    restored: dict[str, Any] = {}  # reported with every event of this run
    if io.restore_dir is not None:
        state = load_checkpoint(engine, io.restore_dir, io)
        step, epoch, iters_done = state["step"], state["epoch"], state["iters_in_epoch"]
        skip_iters = 0 if state["data_restored"] else iters_done
        apply_hyperparameters(engine, scheduler, cfg, log)
        log.info("resumed from %s at step %d (epoch %d, iter %d)", io.restore_dir, step, epoch + 1, iters_done)
        restored["restore/step"] = step
        if io.fingerprint_restore:
            checksum = weights_checksum(engine)
            restored.update({"restore/weights_sum": checksum["sum"], "restore/weights_sum_sq": checksum["sum_sq"]})
    end_step = num_steps if io.stop_at_step is None else min(num_steps, io.stop_at_step)
    if step >= end_step:
        log.info("checkpoint is already at step %d of %d; nothing to train", step, end_step)
    log.info(
        "training %s on %d worker(s): %d steps (%d per epoch), global batch %d = %d micro x %d accumulation x %d "
        "workers, ZeRO-%d, %s, %d training rows",
        cfg.model.name_or_path, world_size, num_steps, per_epoch, cfg.global_batch_size, cfg.train.micro_batch_size,
        cfg.train.gradient_accumulation_steps, world_size, cfg.deepspeed.zero_stage, cfg.deepspeed.precision,
        io.num_train_rows,
    )  # fmt: skip
    if end_step < num_steps:
        log.info("this run pauses at step %d of %d (checkpointed; the LR schedule spans all %d)", end_step,
                 num_steps, num_steps)  # fmt: skip

    placeholder = _placeholder_rows(cfg)
    fail_at_step = int(os.environ.get(FAIL_AT_STEP_ENV, 0)) if io.restore_dir is None else None
    accum = cfg.train.gradient_accumulation_steps
    checkpoint_every = cfg.run.checkpoint_every_steps
    # Window counters stay on the device; they are read only at log steps (one sync per log line).
    window = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, real iters, rows, tokens
    window_start = time.perf_counter()
    train_start = time.perf_counter()
    start_step = step
    last_train_loss = first_train_loss = float("nan")
    eval_metrics: dict[str, Any] | None = None
    first_step_pending = True
    first_step_end = train_start

    def report(event_metrics: dict[str, Any], checkpoint: bool) -> None:
        state = {"step": step, "epoch": epoch, "iters_in_epoch": iters_done}
        path = save_checkpoint(engine, io, cfg, tokenizer, state, eval_metrics) if checkpoint else None
        io.report({"step": step, "epoch": epoch, **restored, **event_metrics}, path)

    def eval_and_report(checkpoint: bool, extra: dict[str, Any] | None = None) -> None:
        nonlocal eval_metrics
        scalars: dict[str, Any] = {"train/loss": last_train_loss, **(extra or {})}
        if io.eval_batches is not None:
            eval_metrics = evaluate(engine, cfg, tokenizer, io.eval_batches())
            scalars.update(flat_scalars(eval_metrics, "eval"), eval=eval_metrics)
            log.info(
                "eval at step %d: loss %.4f, accuracy %.4f, macro-F1 %.4f (%d examples)",
                step, eval_metrics["loss"], eval_metrics["accuracy"], eval_metrics["macro_f1"],
                eval_metrics["num_examples"],
            )  # fmt: skip
        report(scalars, checkpoint)

    # With `epochs`, stop after the last epoch even if the step plan was an estimate; with `max_steps`,
    # run as many epochs as it takes.
    while step < end_step and (cfg.train.max_steps is not None or epoch < cfg.train.epochs):
        batches = iter(io.train_batches(epoch))
        # Mid-epoch resume from a source without a saved position: skip what was trained on.
        for _ in range(skip_iters):
            next(batches, None)
        skip_iters = 0
        epoch_iters = _joined(batches, device)
        while step < end_step:
            rows = next(epoch_iters, _EPOCH_OVER)
            at_boundary = (iters_done + 1) % accum == 0
            if rows is _EPOCH_OVER:
                if iters_done % accum == 0:
                    break  # every rank is out of data and no accumulation is pending
                rows = None  # finish the pending accumulation with placeholders, so epochs end on a step
            # A rank out of data (or the epoch's last, partial accumulation) runs a zero-weight
            # placeholder so that every rank takes part in every collective and every step.
            batch = task.collate(rows or placeholder, tokenizer, cfg.data, cfg.model.num_labels)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            if rows is None:
                loss = loss * 0.0
            else:
                window += torch.stack(
                    [loss.detach().double(), loss.new_tensor(1.0, dtype=torch.float64),
                     loss.new_tensor(len(batch["labels"]), dtype=torch.float64),
                     batch["attention_mask"].sum().double()]
                )  # fmt: skip
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the optimizer only at accumulation boundaries
            iters_done += 1
            if not at_boundary:
                continue
            step += 1
            if fail_at_step == step:
                raise RuntimeError(f"{FAIL_AT_STEP_ENV}={step}: injected failure after step {step}")
            if first_step_pending:
                first_step_end = time.perf_counter()
                timings["first_step_s"] = first_step_end - train_start
                timings["time_to_first_step_s"] = time.perf_counter() - t_enter + timings.get("worker_group_s", 0.0)
                first_step_pending = False
            if step % cfg.train.log_every_steps == 0 or step == end_step:
                # Collective + host sync: global loss and throughput over the window.
                dist.all_reduce(window)
                loss_sum, n_iters, n_rows, n_tokens = window.tolist()
                elapsed = time.perf_counter() - window_start
                last_train_loss = loss_sum / max(n_iters, 1)
                if math.isnan(first_train_loss):
                    first_train_loss = last_train_loss
                rate = (step - start_step) / (time.perf_counter() - train_start)
                log.info(
                    "step %d/%d (%.1f%%) | epoch %d | loss %.4f | lr %.2e | %.1f samples/s | %.0f tokens/s | ETA %s",
                    step, num_steps, 100 * step / num_steps, epoch + 1, last_train_loss,
                    engine.get_lr()[0], n_rows / elapsed, n_tokens / elapsed,
                    _fmt_duration((end_step - step) / rate),
                )  # fmt: skip
                window.zero_()
                window_start = time.perf_counter()
            do_eval = cfg.train.eval_every_steps is not None and step % cfg.train.eval_every_steps == 0
            do_ckpt = checkpoint_every is not None and step % checkpoint_every == 0
            if step < end_step and do_eval:
                eval_and_report(checkpoint=do_ckpt or checkpoint_every is None)
            elif step < end_step and do_ckpt:
                report({"train/loss": last_train_loss}, checkpoint=True)
        if step >= end_step:
            break
        epoch += 1
        iters_done = 0
        if cfg.train.eval_every_steps is None and step < end_step:
            eval_and_report(checkpoint=checkpoint_every is None)

    now = time.perf_counter()
    train_time = now - train_start
    samples = (step - start_step) * cfg.global_batch_size
    # Throughput after the first step: start-up (first batch, lazy inits) is reported in timings.
    steady = (
        (step - start_step - 1) * cfg.global_batch_size / (now - first_step_end)
        if step - start_step > 1
        else float("nan")
    )
    summary = {
        "train/first_loss": first_train_loss,
        "train/time_s": train_time,
        "train/samples_per_s": samples / train_time if train_time > 0 else float("nan"),
        "train/steady_samples_per_s": steady,
        "timings": timings,
    }
    log.info(
        "finished %d steps in %s (%.1f samples/s)", step, _fmt_duration(train_time), summary["train/samples_per_s"]
    )
    # The final report carries the whole summary, so the driver has it wherever rank 0 ran.
    eval_and_report(checkpoint=True, extra=summary)
    return {"step": step, "train/loss": last_train_loss, "eval": eval_metrics, **summary}
