"""The loop without Ray: one rank in this process (gloo), plain Python iterators as the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmdist.config import from_dict
from fmdist.data.sources import resolve
from fmdist.train.checkpoint import STATE_FILE, consolidated_state_dict
from fmdist.train.loop import LoopIO, fit
from tests.conftest import TINY_MODEL, sentiment_rows, write_shards
from tests.inprocess import run_in_process


def micro_batches(rows: dict[str, list], size: int) -> list[dict[str, list]]:
    n = len(rows["label"])
    return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, n, size)]


def test_fit_runs_in_process_and_learns(tmp_path):
    """World size 1. 100 rows / micro 8 = 13 iters per epoch, the last one partial (4 rows)."""
    cfg = from_dict(
        {
            "model": dict(TINY_MODEL),
            "data": {"train": "unused-by-the-loop"},
            "train": {
                "epochs": 3,
                "micro_batch_size": 8,
                "gradient_accumulation_steps": 2,
                "lr": 3e-3,
                "log_every_steps": 2,
            },
            "deepspeed": {"zero_stage": 1},
            "scaling": {"num_workers": 1},
        }
    )
    train_rows, eval_rows = sentiment_rows(100, seed=3), sentiment_rows(40, seed=4)
    reports: list[tuple[dict, str | None]] = []
    seen_epochs: list[int] = []

    def train_batches(epoch: int):
        seen_epochs.append(epoch)
        return iter(micro_batches(train_rows, 8))

    io = LoopIO(
        train_batches=train_batches,
        iters_per_epoch=lambda epoch: 13,
        num_train_rows=100,
        report=lambda metrics, path: reports.append((metrics, path)),
        scratch_dir=str(tmp_path),
        eval_batches=lambda: iter(micro_batches(eval_rows, 8)),
    )
    summary = fit(cfg, io)
    # 13 iters with accumulation 2 -> 7 steps per epoch (the 14th iter is a zero-weight placeholder).
    assert summary["step"] == 21
    assert seen_epochs == [0, 1, 2]
    # The start-up phases are contiguous and add up to the time to first step.
    phases = {k: v for k, v in summary["timings"].items() if k != "time_to_first_step_s"}
    assert set(phases) == {"process_group_s", "model_load_s", "deepspeed_init_s", "restore_s", "first_step_s"}
    assert summary["timings"]["time_to_first_step_s"] == pytest.approx(sum(phases.values()))
    assert summary["train/loss"] < summary["train/first_loss"]
    assert summary["eval"]["num_examples"] == 40
    # An evaluation after epochs 1 and 2 and a final one; each with a checkpoint.
    assert [m["step"] for m, _ in reports] == [7, 14, 21]
    last_metrics, last_path = reports[-1]
    assert last_metrics["eval/accuracy"] == summary["eval"]["accuracy"]
    state = json.loads((Path(last_path) / STATE_FILE).read_text())
    assert (state["step"], state["epoch"], state["iters_in_epoch"]) == (21, 2, 14)  # end of the 3rd epoch
    assert (Path(last_path) / "hf" / "config.json").is_file() and (Path(last_path) / "rng_rank0.json").is_file()


def test_pause_at_step_keeps_the_schedule_and_a_restore_takes_new_hyperparameters(tmp_path):
    """A run paused at step 4 and continued equals the uninterrupted run (the LR schedule spans all 8
    steps either way); continuing with another lr (a PBT exploit) rescales the schedule, and the
    restored weights' checksum equals the checkpoint's consolidated weights."""
    import torch

    raw = {
        "model": dict(TINY_MODEL),
        "train": {"max_steps": 8, "micro_batch_size": 8, "lr": 3e-3, "log_every_steps": 4},
        "data": {"train": "unused-by-the-loop", "shuffle_window_rows": 16},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
    }
    # The real per-rank stream over 4 shards, shuffled, so the pause lands mid-epoch with rows in
    # the shuffle window: the resumed run must continue the stream exactly, not restart it.
    source = resolve(str(write_shards(tmp_path / "shards", sentiment_rows(64, seed=5), rows_per_shard=16)))

    def run(name: str, cfg_raw: dict, stop: int | None = None, restore: str | None = None) -> list:
        return run_in_process(from_dict(cfg_raw), source, str(tmp_path / name), stop=stop, restore=restore)[1]

    whole = run("whole", raw)[-1]
    paused = run("paused", raw, stop=4)[-1]
    assert paused[0]["step"] == 4
    resumed = run("resumed", raw, restore=paused[1])[-1]
    assert resumed[0]["step"] == 8 and resumed[0]["restore/step"] == 4
    at_pause = consolidated_state_dict(paused[1])
    floats = [t.double() for t in at_pause.values() if t.is_floating_point()]
    assert resumed[0]["restore/weights_sum"] == pytest.approx(sum(t.sum().item() for t in floats), rel=1e-12)
    assert resumed[0]["restore/weights_sum_sq"] == pytest.approx(sum((t * t).sum().item() for t in floats), rel=1e-12)
    a, b = consolidated_state_dict(whole[1]), consolidated_state_dict(resumed[1])
    assert max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point()) < 1e-6

    faster = {**raw, "train": {**raw["train"], "lr": 6e-3, "weight_decay": 0.05}}
    perturbed = run("perturbed", faster, restore=paused[1])[-1]
    states = torch.load(Path(perturbed[1]) / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["lr_scheduler"]["base_lrs"] == [6e-3, 6e-3]
    c = consolidated_state_dict(perturbed[1])
    assert max((a[k] - c[k]).abs().max().item() for k in a if a[k].is_floating_point()) > 1e-4


def test_every_training_forward_runs_in_training_mode(tmp_path, monkeypatch):
    """from_pretrained returns a model in eval mode (dropout off); the loop must switch it to training."""
    import dataclasses

    from fmdist import tasks

    real = tasks.get("sequence-classification")
    modes: list[bool] = []

    def build_in_eval_mode(cfg):
        model = real.build_model(cfg).eval()  # as from_pretrained leaves it
        model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
        return model

    patched = dataclasses.replace(real, build_model=build_in_eval_mode)
    monkeypatch.setattr(tasks, "get", lambda name: patched)
    cfg = from_dict({"model": dict(TINY_MODEL), "data": {"train": "unused"}, "train": {"max_steps": 3, "micro_batch_size": 8},
                     "scaling": {"num_workers": 1}})  # fmt: skip
    source = resolve(str(write_shards(tmp_path / "shards", sentiment_rows(24, seed=5), rows_per_shard=8)))
    run_in_process(cfg, source, str(tmp_path / "run"))
    assert modes == [True, True, True], modes
