"""The `peft:` and `distill:` sections through the loop (world size 1, in-process): a LoRA run under ZeRO-3
checkpoints only what trains, resumes exactly, and exports merged or as an adapter; a student starts from its
teacher's layers and learns from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmdist.config import from_dict
from fmdist.predict import evaluate
from fmdist.train.checkpoint import DS_TAG, consolidated_state_dict
from fmdist.train.export import export
from fmdist.train.launch import open_data
from tests.conftest import TINY_MODEL
from tests.inprocess import run_in_process


def raw_config(sentiment_data, root: Path, **sections) -> dict:
    raw = {
        "model": {**TINY_MODEL, "from_config": {**TINY_MODEL["from_config"], "num_hidden_layers": 2}},
        "data": {"train": sentiment_data["train"], "eval": sentiment_data["eval"], "shuffle_window_rows": 16},
        "train": {"max_steps": 80, "micro_batch_size": 8, "lr": 5e-3, "log_every_steps": 20},
        "deepspeed": {"zero_stage": 3},
        "scaling": {"num_workers": 1},
        "run": {"name": "run", "storage_path": str(root / "runs")},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def train(raw: dict, scratch: Path, **kwargs):
    cfg = from_dict(raw)
    sources = open_data(cfg)
    return run_in_process(cfg, sources["train"], str(scratch), sources["eval"], **kwargs)


def size_of(directory: str) -> int:
    return sum(f.stat().st_size for f in Path(directory, DS_TAG).rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def lora(sentiment_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    raw = raw_config(sentiment_data, root, peft={"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0})
    whole, reports = train(raw, root / "whole")
    _, paused = train(raw, root / "paused", stop=15)
    _, resumed = train(raw, root / "resumed", restore=paused[-1][1])
    _, full = train(raw_config(sentiment_data, root), root / "full")
    return {"raw": raw, "whole": whole, "reports": reports, "resumed": resumed, "full": full, "root": root}


def test_lora_checkpoints_hold_only_what_trains_and_resume_exactly(lora):
    state = consolidated_state_dict(lora["reports"][-1][1])
    assert state and all("lora_" in k or ".classifier." in k for k in state), sorted(state)[:5]
    assert size_of(lora["reports"][-1][1]) < size_of(lora["full"][-1][1]) / 3
    resumed = consolidated_state_dict(lora["resumed"][-1][1])
    for name in state:
        torch.testing.assert_close(resumed[name], state[name], rtol=0, atol=0, msg=name)
    # LoRA's B matrices start at zero: trained, they are not (on this random base the task is not learned).
    assert all(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)


def test_lora_exports_merged_for_plain_transformers_and_as_an_adapter(lora, sentiment_data):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    checkpoint = lora["reports"][-1][1]
    merged = export(checkpoint, str(lora["root"] / "merged"))
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert not [k for k in model.state_dict() if "lora" in k]
    exported = evaluate(merged, sentiment_data["eval"])
    assert exported["confusion_matrix"] == lora["whole"]["eval"]["confusion_matrix"]
    assert exported["loss"] == pytest.approx(lora["whole"]["eval"]["loss"], rel=1e-4)

    adapter = export(checkpoint, str(lora["root"] / "adapter"), adapter=True)
    torch.manual_seed(42)  # the base is built from its config, seeded as training seeded it
    base = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(merged))
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    batch = {"input_ids": torch.tensor([[101, 2307, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=0)


def test_a_student_starts_from_its_teacher_and_learns_from_it(sentiment_data, tmp_path):
    """Teacher: 2 layers, trained. Student: 1 layer (teacher layer 0), distilled with alpha 0.5; the same
    student from random weights starts far worse."""
    raw = raw_config(sentiment_data, tmp_path, deepspeed={"zero_stage": 2})
    teacher_summary, teacher_reports = train(raw, tmp_path / "teacher")
    teacher_dir = export(teacher_reports[-1][1], str(tmp_path / "teacher_model"))
    student_model = {"name_or_path": teacher_dir, "num_labels": 2, "from_config": {"num_hidden_layers": 1}}
    distill = {"teacher": teacher_dir, "alpha": 0.5, "temperature": 2.0, "init_from_teacher": True}
    distilled, _ = train(
        {**raw, "model": student_model, "train": {**raw["train"], "max_steps": 10}, "distill": distill},
        tmp_path / "student",
    )
    cold, _ = train(
        {**raw, "model": student_model, "train": {**raw["train"], "max_steps": 10}},
        tmp_path / "cold",
    )
    assert teacher_summary["eval"]["accuracy"] > 0.8
    assert distilled["train/first_loss"] < cold["train/first_loss"] - 0.2
    assert distilled["eval"]["accuracy"] >= cold["eval"]["accuracy"]
