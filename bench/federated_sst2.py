"""Federated vs centralised fine-tuning of MiniLM on an SST-2 subset, side by side in one run (issue 13).

Three arms, the same rows, the same model start and the same number of passes over every row:

- centralised    one party holds all `--rows` rows and makes `rounds x local_epochs` passes over them: the
                 client's own code path (`fmdist.federate.train_client`: fmdist's loop, one rank, a DeepSpeed
                 ZeRO-0 engine) without Ray and without aggregation, then the same global evaluation;
- federated-iid  `fmdist.federate.federate`: `--clients` clients with shuffled equal shares, all of them
                 sampled each round, `--rounds` rounds of `local_epochs` passes, FedAvg (Flower, on Ray);
- federated-dirichlet  the same with each label's rows dealt by Dirichlet(`--alpha`) proportions (skewed).

The preset is `configs/sst2-minilm.yaml` (all-MiniLM-L6-v2) with `data.max_length`, lr and warm-up overridden
(the same for every arm). Training rows: the first `--rows` rows of `data/sst2/train-8k.parquet`; every arm is
scored on the whole 872-sentence GLUE SST-2 dev set (`data/sst2/glue-dev.parquet`), which nothing trains on.
Prints accuracy, macro-F1 and wall time per arm and writes `<work>/federated_sst2.json`.

    nice -n 10 .venv/bin/python bench/federated_sst2.py --work /tmp/fed-sst2

Accuracy does not depend on how loaded the machine is; wall times do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "sst2-minilm.yaml"
TRAIN = ROOT / "data" / "sst2" / "train-8k.parquet"
DEV = ROOT / "data" / "sst2" / "glue-dev.parquet"


def subset(rows: int, work: Path) -> Path:
    """The first `rows` rows of the SST-2 train slice, as the one Parquet file every arm trains on."""
    import pyarrow.parquet as pq

    path = work / f"train-{rows}.parquet"
    pq.write_table(pq.read_table(TRAIN).slice(0, rows), path)
    return path


def config(args: argparse.Namespace, train: Path, name: str, extra: list[str]) -> Any:
    from fmdist.config import load

    return load(
        PRESET,
        [
            f"data.train={train}",
            f"data.eval={DEV}",
            f"data.max_length={args.max_length}",
            f"train.lr={args.lr}",
            "train.warmup_ratio=0.0",
            f"run.name={name}",
            f"run.storage_path={args.work / 'runs'}",
            f"federate.num_clients={args.clients}",
            f"federate.rounds={args.rounds}",
            f"federate.local_epochs={args.local_epochs}",
            f"federate.seed={args.seed}",
            "scaling.num_workers=2",  # two clients train at once, one per core
            *extra,
        ],
    )


def centralised(args: argparse.Namespace, train: Path) -> dict[str, Any]:
    """All rows at one party, `rounds x local_epochs` passes, through the clients' own fit; no aggregation."""
    import numpy as np
    import pyarrow as pa

    from fmdist import tasks
    from fmdist.config import run_dir_uri
    from fmdist.data.sources import iter_tables
    from fmdist.federate import (
        evaluate_global,
        global_model,
        load_trainable,
        train_client,
        trainable_state,
        write_partitions,
    )
    from fmdist.train.launch import open_data

    started = time.time()
    cfg = config(args, train, "centralised", [f"federate.local_epochs={args.rounds * args.local_epochs}"])
    sources = open_data(cfg)
    table = pa.concat_tables(iter_tables(sources["train"]))
    [uri] = write_partitions(table, [np.arange(table.num_rows)], run_dir_uri(cfg))
    model = global_model(cfg)
    trained, fit = train_client(cfg, uri, trainable_state(model), mu=0.0)
    load_trainable(model, trained)
    processor = tasks.get(cfg.model.task).load_processor(cfg.model.tokenizer or cfg.model.name_or_path)
    metrics = evaluate_global(model, cfg, processor, sources["eval"])
    return {"eval": {k: float(v) for k, v in metrics["scalars"].items()}, "steps": fit["steps"],
            "time_s": time.time() - started}  # fmt: skip


def federated(args: argparse.Namespace, train: Path, name: str, extra: list[str]) -> dict[str, Any]:
    from fmdist.federate import federate

    started = time.time()
    results = federate(config(args, train, name, extra))
    return {
        "eval": results["rounds"][-1]["eval"],
        "per_round_accuracy": [r["eval"]["accuracy"] for r in results["rounds"]],
        "clients": results["clients"],
        "steps": sum(c["steps"] for r in results["rounds"] for c in r["clients"]),
        "time_s": time.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fed-sst2"))
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="centralised,federated-iid,federated-dirichlet")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train = subset(args.rows, args.work)
    runs = {
        "centralised": lambda: centralised(args, train),
        "federated-iid": lambda: federated(args, train, "federated-iid", ["federate.partition=iid"]),
        "federated-dirichlet": lambda: federated(
            args, train, "federated-dirichlet", ["federate.partition=dirichlet", f"federate.alpha={args.alpha}"]
        ),
    }
    out = args.work / "federated_sst2.json"
    record: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average at start {os.getloadavg()}",
        "arms": {},
    }
    for arm in args.arms.split(","):
        record["arms"][arm] = runs[arm]()
        out.write_text(json.dumps(record, indent=2, default=str))  # after every arm: a crash keeps the earlier
    print(f"\n{'arm':<22}{'accuracy':>10}{'macro-F1':>10}{'steps':>8}{'wall s':>9}")
    for arm, r in record["arms"].items():
        print(f"{arm:<22}{r['eval']['accuracy']:>10.4f}{r['eval']['macro_f1']:>10.4f}{r['steps']:>8.0f}"
              f"{r['time_s']:>9.0f}")  # fmt: skip
    print(f"written: {out}")


if __name__ == "__main__":
    main()
