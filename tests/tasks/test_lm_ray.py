"""Language modelling and LoRA on Ray Train: 2 workers (world size 2); causal LM on packed text under ZeRO-2,
masked LM with LoRA under ZeRO-3, exports that plain transformers loads, and a Tune search over peft.r."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmdist.config import from_dict
from fmdist.predict import evaluate
from fmdist.train.export import export
from fmdist.train.launch import open_data, train
from fmdist.tune.search import tune_run
from tests.conftest import TINY_MODEL, sentiment_rows, write_shards
from tests.tasks.test_language_modeling import GPT_DIR, TINY_GPT, corpus

pytestmark = pytest.mark.usefixtures("ray_cluster")


def causal_config(root: Path, **sections) -> dict:
    raw = {
        "model": {"name_or_path": GPT_DIR, "task": "causal-lm", "from_config": TINY_GPT},
        "data": {"train": str(corpus(root, 20_000)), "eval_fraction": 0.1, "max_length": 32},
        "train": {"max_steps": 16, "micro_batch_size": 8, "lr": 1e-2, "log_every_steps": 8},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"name": "causal", "storage_path": str(root / "runs")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_causal_lm_on_two_workers_counts_every_eval_token_once(tmp_path):
    from transformers import AutoModelForCausalLM

    raw = causal_config(tmp_path)
    summary = train(from_dict(raw))
    evaluation = open_data(from_dict(raw))["eval"].manifest
    assert summary["step"] == 16
    # Both ranks' tokens, each once: every eval token but the first of each block is predicted.
    assert summary["eval"]["tokens"] == evaluation["packing"]["tokens"] - evaluation["total_rows"]
    assert summary["train/loss"] < summary["train/first_loss"]
    model_dir = export(summary["run_dir"], str(tmp_path / "model"))
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.n_layer == 1


def test_masked_lm_with_lora_under_zero3_exports_merged_and_scores_alike(tmp_path):
    from transformers import AutoModelForMaskedLM

    rows = sentiment_rows(320, seed=7)
    train_dir = write_shards(tmp_path / "train", {"text": rows["sentence"], "label": rows["label"]}, rows_per_shard=40)
    eval_rows = sentiment_rows(45, seed=8)  # odd: ranks get 22 and 23 rows
    eval_dir = write_shards(
        tmp_path / "eval", {"text": eval_rows["sentence"], "label": eval_rows["label"]}, rows_per_shard=45
    )
    model = {k: v for k, v in TINY_MODEL.items() if k != "num_labels"}
    raw = {
        "model": {**model, "task": "masked-lm"},
        "data": {"train": str(train_dir), "eval": str(eval_dir), "max_length": 24},
        "train": {"max_steps": 12, "micro_batch_size": 8, "lr": 1e-2, "log_every_steps": 6},
        "deepspeed": {"zero_stage": 3},
        "scaling": {"num_workers": 2},
        "peft": {"method": "lora", "r": 4, "target_modules": ["query", "value"]},
        "run": {"name": "mlm-lora", "storage_path": str(tmp_path / "runs")},
    }
    summary = train(from_dict(raw))
    assert summary["eval"]["num_examples"] == 45
    model_dir = export(summary["run_dir"], str(tmp_path / "model"))
    merged = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert not [k for k in merged.state_dict() if "lora" in k]
    # Evaluation masks each row by its own seed, so the merged export scores exactly what the run did.
    exported = evaluate(model_dir, str(eval_dir), max_length=24)
    assert exported["tokens"] == summary["eval"]["tokens"]
    # Not bit-equal: the run scored with the unmerged adapters on two ranks (other batch padding).
    assert exported["loss"] == pytest.approx(summary["eval"]["loss"], rel=2e-3)


@pytest.mark.slow
def test_tune_searches_the_lora_rank_of_a_causal_lm(tmp_path):
    raw = causal_config(
        tmp_path,
        train={"max_steps": 8},
        scaling={"num_workers": 1},
        peft={"method": "lora", "r": 2},
        run={"name": "lora-search"},
        tune={"search_space": {"peft.r": {"grid": [2, 8]}}, "metric": "eval/loss", "mode": "min", "num_samples": 1},
    )
    summary = tune_run(from_dict(raw))
    rows = summary["leaderboard"]
    assert sorted(r["config"]["peft.r"] for r in rows) == [2, 8] and all(r["status"] == "DONE" for r in rows)
    # Each trial reported its eval loss (LoRA on this random tiny base learns little; what is searched is r).
    assert all(0 < r["final_metric"] < 10 for r in rows), rows
    from transformers import AutoModelForCausalLM

    best = AutoModelForCausalLM.from_pretrained(summary["best_model"])
    assert not [k for k in best.state_dict() if "lora" in k]
