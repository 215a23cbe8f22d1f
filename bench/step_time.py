"""fmdist's step time against a bare DeepSpeed loop and a bare PyTorch loop, side by side in one run.

Same model, data, ZeRO stage, micro batch and worker count for fmdist and bare DeepSpeed; the bare
PyTorch loop is one process with every core and the whole global batch (the reference the issue
quotes). Prints steady-state samples/s, the ratios, and fmdist's time to first step broken down.

    python bench/step_time.py --data data/sst2/train-8k.parquet --steps 60

Figures go to docs/benchmarks.md with date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import pyarrow.parquet as pq
import torch
import torch.multiprocessing as mp

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def batches(data: str, tokenizer, micro: int, count: int, offset: int, stride: int) -> list[dict]:
    """`count` tokenized micro-batches: micro-batch i of this rank is global micro-batch offset + i*stride."""
    table = pq.read_table(data)
    texts, labels = table.column("sentence").to_pylist(), table.column("label").to_pylist()
    out = []
    for i in range(count):
        start = ((offset + i * stride) * micro) % (len(texts) - micro)
        enc = tokenizer(
            texts[start : start + micro], truncation=True, max_length=128, padding="longest", return_tensors="pt"
        )
        out.append({**enc, "labels": torch.tensor(labels[start : start + micro])})
    return out


def _model_and_tokenizer():
    from fmdist.config import freeze_labels, from_dict
    from fmdist.tasks import get

    torch.manual_seed(0)
    cfg = from_dict({"data": {"train": "unused"}, "model": {"num_labels": 2}})
    freeze_labels(cfg, None)
    task = get(cfg.model.task)
    return task.build_model(cfg), task.load_processor(cfg.model.name_or_path)


def bare_deepspeed_rank(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    import deepspeed

    from fmdist.config import from_dict
    from fmdist.train.ds_config import build_ds_config

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(args.threads_per_worker)  # as Ray does for a 1-CPU worker (OMP_NUM_THREADS)
    deepspeed.init_distributed(dist_backend="gloo")
    model, tokenizer = _model_and_tokenizer()
    cfg = from_dict(
        {
            "data": {"train": args.data},
            "train": {"micro_batch_size": args.micro},
            "deepspeed": {"zero_stage": args.zero_stage},
        }
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=5e-5), config=build_ds_config(cfg, world, False)
    )
    data = batches(args.data, tokenizer, args.micro, args.steps + 1, rank, world)
    for i, batch in enumerate(data):
        if i == 1:
            torch.distributed.barrier()
            t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    torch.distributed.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"samples_per_s": args.steps * args.micro * world / (time.perf_counter() - t0)}, f)


def bare_deepspeed(args: argparse.Namespace) -> float:
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(bare_deepspeed_rank, args=(args.workers, args, 29000 + os.getpid() % 1000, out), nprocs=args.workers)
    with open(out) as f:
        return json.load(f)["samples_per_s"]


def bare_pytorch(args: argparse.Namespace) -> float:
    """One process, all cores, the whole global batch per step: the single-machine reference."""
    from transformers import get_scheduler

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = _model_and_tokenizer()
    model.train()
    global_batch = args.micro * args.workers
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=args.steps + 1)
    data = batches(args.data, tokenizer, global_batch, args.steps + 1, 0, 1)
    for i, batch in enumerate(data):
        if i == 1:
            t0 = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    return args.steps * global_batch / (time.perf_counter() - t0)


def fmdist_run(args: argparse.Namespace) -> dict:
    from fmdist.config import from_dict
    from fmdist.train.launch import train

    raw = {
        "data": {"train": os.path.abspath(args.data)},
        "train": {"max_steps": args.steps + 1, "micro_batch_size": args.micro, "log_every_steps": 20, "shuffle": False},
        "deepspeed": {"zero_stage": args.zero_stage},
        "scaling": {"num_workers": args.workers},
        "run": {"name": "bench", "storage_path": tempfile.mkdtemp(prefix="fmdist-bench-")},
    }
    return train(from_dict(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/sst2/train-8k.parquet")
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    args = parser.parse_args()

    fm = fmdist_run(args)
    ds = bare_deepspeed(args)
    pt = bare_pytorch(args)
    fm_rate = fm["train/steady_samples_per_s"]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU")
    print(
        f"model all-MiniLM-L6-v2, ZeRO-{args.zero_stage}, {args.workers} workers x micro {args.micro}, {args.steps} steps\n"
    )
    print(f"{'loop':<34}{'samples/s':>10}{'fmdist / this':>15}")
    print(f"{'fmdist (Ray Train + Ray Data)':<34}{fm_rate:>10.1f}{1.0:>15.2f}")
    print(f"{'bare deepspeed.initialize':<34}{ds:>10.1f}{fm_rate / ds:>15.2f}")
    print(f"{'bare PyTorch, 1 process':<34}{pt:>10.1f}{fm_rate / pt:>15.2f}")
    print("\nfmdist time to first step:")
    for key, value in fm["timings"].items():
        print(f"  {key:<24}{value:>8.1f} s")


if __name__ == "__main__":
    main()
