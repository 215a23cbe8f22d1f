"""The data path, side by side in one run on the same shards.

1. rows/s of a raw `pyarrow.parquet.ParquetFile.iter_batches` scan;
2. rows/s of fmdist's stream, read only (verified shards, shuffle window, micro-batches of columns);
3. rows/s of the stream with tokenization (the model's fast tokenizer, max length 128);
4. training samples/s with the real stream divided by samples/s with the same batches pre-loaded in
   memory (one rank in this process, the all-MiniLM-L6-v2 model, ZeRO-2).

    python bench/data_stream.py --copies 10 --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pyarrow.parquet as pq  # noqa: E402

from fmdist.config import from_dict  # noqa: E402
from fmdist.data.prepare import prepare  # noqa: E402
from fmdist.data.sources import resolve  # noqa: E402
from fmdist.data.stream import ShardStream  # noqa: E402


def make_shards(copies: int, rows_per_shard: int) -> str:
    root = tempfile.mkdtemp(prefix="fmdist-bench-data-")
    table = pq.read_table("data/sst2/train-8k.parquet")
    src = os.path.join(root, "src.csv")
    import pyarrow.csv as pacsv

    for _ in range(copies):
        with open(src, "ab") as f:
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=_ == 0))
    prepare([src], os.path.join(root, "shards"), rows_per_shard=rows_per_shard)
    return os.path.join(root, "shards", "train")


def rate(fn) -> float:
    t0 = time.perf_counter()
    rows = fn()
    return rows / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10, help="copies of the 8,000 SST-2 rows")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved training rounds per variant")
    args = parser.parse_args()

    from fmdist.config import ModelConfig
    from fmdist.tasks.common import load_tokenizer

    shards = make_shards(args.copies, args.rows_per_shard)
    source = resolve(shards)
    tokenizer = load_tokenizer(ModelConfig().name_or_path)

    def raw_scan() -> int:
        n = 0
        for path in source.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=args.micro):
                n += batch.num_rows
        return n

    def stream(tokenize: bool = False) -> int:
        n = 0
        s = ShardStream(source, slot=0, slots=1, epoch=0, seed=0, shuffle=True, window_rows=1024)
        for batch in s.batches(args.micro):
            if tokenize:
                tokenizer(batch["sentence"], truncation=True, max_length=128, padding="longest", return_tensors="pt")
            n += len(batch["row_id"])
        return n

    raw = rate(raw_scan)
    read = rate(stream)
    tok = rate(lambda: stream(True))

    from fmdist.train.loop import LoopIO, fit

    cfg = from_dict(
        {
            "model": {"num_labels": 2},
            "data": {"train": shards},
            "train": {"max_steps": args.steps, "micro_batch_size": args.micro, "log_every_steps": 10**6},
            "deepspeed": {"zero_stage": 2},
            "scaling": {"num_workers": 1},
        }
    )
    total = source.manifest["total_rows"]

    def streamed(epoch: int):
        return ShardStream(source, slot=0, slots=1, epoch=epoch, seed=0, shuffle=True, window_rows=1024).batches(
            args.micro
        )

    preloaded = [b for _, b in zip(range(args.steps + 2), streamed(0), strict=False)]
    # Interleaved rounds (A B A B ...) so that drift on a shared machine hits both alike.
    results: dict[str, list[float]] = {"preloaded": [], "stream": []}
    for _ in range(args.rounds):
        for name, batches in (("preloaded", lambda epoch: iter(preloaded)), ("stream", streamed)):
            io = LoopIO(
                train_batches=batches,
                iters_per_epoch=lambda epoch: args.steps,
                num_train_rows=total,
                report=lambda m, p: None,
                scratch_dir=tempfile.mkdtemp(),
            )
            results[name].append(fit(cfg, io)["train/steady_samples_per_s"])
    ratios = [st / pre for st, pre in zip(results["stream"], results["preloaded"], strict=True)]

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {total} rows in {len(source.files)} shards")
    print(f"{'path':<40}{'rows/s':>12}{'ratio':>10}")
    print(f"{'raw ParquetFile.iter_batches scan':<40}{raw:>12.0f}{1.0:>10.2f}")
    print(f"{'fmdist stream, read only':<40}{read:>12.0f}{read / raw:>10.2f}  (vs raw scan)")
    print(f"{'fmdist stream + tokenization':<40}{tok:>12.0f}{tok / raw:>10.2f}  (vs raw scan)")
    for i, ratio in enumerate(ratios):
        print(
            f"training round {i + 1}: pre-loaded {results['preloaded'][i]:.1f} samples/s, "
            f"real stream {results['stream'][i]:.1f} samples/s, ratio {ratio:.3f}"
        )
    print(f"training, real stream / pre-loaded: mean ratio {sum(ratios) / len(ratios):.3f} over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
