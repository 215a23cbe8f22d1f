"""Checkpoints cannot run code: a planted pickle is refused on resume and on export; clean ones resume exactly.

World size 1, in-process (gloo), the tiny model: each ZeRO stage's run is trained once per module.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from fmdist.config import from_dict
from fmdist.data.sources import resolve
from fmdist.train.checkpoint import (
    DS_TAG,
    consolidated_state_dict,
    find,
    problems,
    resume_layout,
    weights_only_loads,
    write_manifest,
)
from fmdist.train.export import export
from tests.conftest import TINY_MODEL, sentiment_rows, write_shards
from tests.inprocess import run_in_process


class Planted:
    """Unpickles as `open(marker, "w")`: proof that loading the file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _raw(zero_stage: int) -> dict:
    return {
        "model": dict(TINY_MODEL),
        "train": {"max_steps": 4, "micro_batch_size": 8, "lr": 3e-3, "log_every_steps": 2},
        "data": {"train": "unused-by-the-loop", "shuffle_window_rows": 8},
        "deepspeed": {"zero_stage": zero_stage},
        "scaling": {"num_workers": 1},
    }


def _run(root: Path, name: str, zero_stage: int, stop: int | None = None, restore: str | None = None) -> str:
    """One rank over 32 rows in 2 shards (4 steps of 8 rows); returns the last checkpoint's directory."""
    cfg = from_dict(_raw(zero_stage))
    source = resolve(str(root / "shards"))
    return run_in_process(cfg, source, str(root / name), stop=stop, restore=restore)[1][-1][1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(zero stage, run) -> that run's last checkpoint, trained once per module when first asked for:
    `whole` (4 steps), `paused` (at step 2 of 4), `resumed` (from `paused`)."""
    roots: dict[int, Path] = {}
    made: dict[tuple[int, str], str] = {}

    def get(zero_stage: int, name: str) -> str:
        if (zero_stage, name) not in made:
            if zero_stage not in roots:
                roots[zero_stage] = tmp_path_factory.mktemp(f"zero{zero_stage}")
                write_shards(roots[zero_stage] / "shards", sentiment_rows(32, seed=5), rows_per_shard=16)
            root = roots[zero_stage]
            restore = get(zero_stage, "paused") if name == "resumed" else None
            stop = 2 if name == "paused" else None
            made[zero_stage, name] = _run(root, name, zero_stage, stop=stop, restore=restore)
        return made[zero_stage, name]

    return get


def _plant(checkpoint: str, into: Path, file: str) -> Path:
    """A copy of `checkpoint` whose `ds/<file>` unpickles a `Planted`; returns the marker it would create."""
    shutil.copytree(checkpoint, into)
    marker = into.parent / f"{into.name}.ran-code"
    target = into / DS_TAG / file
    states = torch.load(target, weights_only=False)  # our own file, written by the run above
    torch.save({**states, "planted": Planted(marker)}, target)
    write_manifest(into, rank=0)  # whoever can plant a file can rewrite the manifest too
    return marker


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_clean_checkpoint_resumes_to_the_uninterrupted_weights(runs, zero_stage):
    """ZeRO-`zero_stage`: paused at step 2 of 4 and resumed under the weights-only loader equals the
    uninterrupted run, and the consolidation (zero_to_fp32 for ZeRO >= 1) loads under it too."""
    whole = consolidated_state_dict(runs(zero_stage, "whole"))
    resumed = consolidated_state_dict(runs(zero_stage, "resumed"))
    assert whole.keys() == resumed.keys()
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole if whole[k].is_floating_point()) < 1e-6
    paused = consolidated_state_dict(runs(zero_stage, "paused"))
    assert max((whole[k] - paused[k]).abs().max().item() for k in whole if whole[k].is_floating_point()) > 1e-4


@pytest.mark.parametrize(
    ("zero_stage", "file"),
    [
        (0, "mp_rank_00_model_states.pt"),
        (2, "mp_rank_00_model_states.pt"),
        (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),  # the file with DeepSpeed's allowlisted types
        (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ],
)
def test_planted_pickle_is_refused_on_resume_consolidation_and_export(runs, tmp_path, zero_stage, file):
    """A pickle that would create a marker file: resume, consolidation and export each refuse the
    checkpoint, naming the file, and the marker never appears."""
    paused = runs(zero_stage, "paused")
    planted = tmp_path / "planted"
    marker = _plant(paused, planted, file)
    named = rf"refused for safety: {re.escape(str(planted / DS_TAG / file))} \(.*open"

    with pytest.raises(RuntimeError, match=named):
        _run(Path(paused).parents[1], "from-planted", zero_stage, restore=str(planted))
    with pytest.raises(RuntimeError, match=named):
        consolidated_state_dict(str(planted))
    with pytest.raises(RuntimeError, match=named):
        export(str(planted), str(tmp_path / "exported"))
    assert not marker.exists()
    assert not (tmp_path / "exported").exists()


def test_weights_only_loads_restores_the_environment(tmp_path, monkeypatch):
    """Forced weights-only inside even when the opposite variable is set, which returns afterwards."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    bad = tmp_path / DS_TAG / "bad.pt"
    bad.parent.mkdir()
    marker = tmp_path / "ran-code"
    torch.save({"planted": Planted(marker)}, bad)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(bad))} \(io.open\)"), weights_only_loads(str(tmp_path)):
        torch.load(bad, weights_only=False)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_fp16_loss_scaler_loads_as_plain_data(tmp_path):
    """fp16 runs only on a GPU, where ZeRO-1/2/3 save a DynamicLossScaler: it loads weights-only, state intact."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(2.0**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False)
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter = 2.0**15, 7, 3  # as after an overflow
    torch.save({"loss_scaler": scaler}, tmp_path / "optim_states.pt")
    with weights_only_loads(str(tmp_path)):
        loaded = torch.load(tmp_path / "optim_states.pt", weights_only=False)["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler)


@pytest.mark.parametrize("remove", ["data_rank0.json", "data_rank0_slot0.arrow", "rng_rank0.json"])
def test_a_missing_per_rank_file_is_an_error_not_a_replay(runs, tmp_path, remove):
    """The stream position used to be optional: without it a resume silently re-read the epoch."""
    broken = tmp_path / "broken"
    shutil.copytree(runs(2, "paused"), broken)
    (broken / remove).unlink()
    write_shards(tmp_path / "shards", sentiment_rows(32, seed=5), rows_per_shard=16)
    with pytest.raises(RuntimeError, match=rf"broken is incomplete or damaged: {re.escape(remove)} is missing"):
        _run(tmp_path, "again", 2, restore=str(broken))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_resume_through_a_universal_checkpoint_is_exact(runs, tmp_path, zero_stage, monkeypatch):
    """The path a resume on another worker count takes (ds_to_universal, then DeepSpeed's universal
    load), forced at the same worker count: it must equal the uninterrupted run. Under ZeRO-3 it did not
    until checkpoint._repair_zero3_universal_load (shared Adam step, first group's weight decay for all)."""
    import fmdist.train.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "needs_universal", lambda directory, world_size: True)
    write_shards(tmp_path / "shards", sentiment_rows(32, seed=5), rows_per_shard=16)
    resumed = consolidated_state_dict(_run(tmp_path, "universal", zero_stage, restore=runs(zero_stage, "paused")))
    whole = consolidated_state_dict(runs(zero_stage, "whole"))
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


def test_a_resume_keeps_the_slots_and_refuses_a_worker_count_that_cannot_share_them():
    """Slots = workers x accumulation of the run that saved: another count that divides them changes the
    accumulation (same global batch); one that does not is refused, naming the counts that fit."""
    meta = {"world_size": 2, "config": {"train": {"gradient_accumulation_steps": 2}}}
    cfg = from_dict(_raw(2))  # 1 worker, accumulation 1
    for workers, accumulation in [(1, 4), (2, 2), (4, 1)]:
        laid_out = resume_layout(cfg, meta, workers)
        assert (laid_out.scaling.num_workers, laid_out.train.gradient_accumulation_steps) == (workers, accumulation)
        assert laid_out.global_batch_size == 4 * cfg.train.micro_batch_size
    with pytest.raises(RuntimeError, match=r"2 worker\(s\) x gradient accumulation 2 = 4 data slots, and 3 "
                                           r"worker\(s\) cannot share.*one of \[1, 2, 4\]"):  # fmt: skip
        resume_layout(cfg, meta, 3)


def _tear(checkpoint: Path, how: str) -> str:
    """Damage `checkpoint` as a kill mid-upload or a bad disk would; returns the file's name."""
    name = f"{DS_TAG}/mp_rank_00_model_states.pt"
    target = checkpoint / name
    data = bytearray(target.read_bytes())
    if how == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(data)
    else:  # no manifest: the rank was killed before it finished saving
        (checkpoint / "manifest_rank0.json").unlink()
        return "manifest_rank0.json"
    return name


@pytest.mark.parametrize("how", ["truncated", "flipped", "unfinished"])
def test_a_torn_checkpoint_is_named_and_never_loaded(runs, tmp_path, how):
    """Sizes and sha256 against each rank's manifest: resuming from a damaged checkpoint is an error
    naming the file, and export passes over it to the previous complete one, announced."""
    run_dir = tmp_path / "run"
    older, newer = run_dir / "checkpoint_step_00000002", run_dir / "checkpoint_step_00000004"
    shutil.copytree(runs(2, "paused"), older)
    shutil.copytree(runs(2, "whole"), newer)
    assert problems(str(newer), deep=True) == []
    name = _tear(newer, how)
    assert any(name in line for line in problems(str(newer), deep=True))
    assert (how == "flipped") == (problems(str(newer)) == [])  # a same-size change needs the sha256
    write_shards(tmp_path / "shards", sentiment_rows(32, seed=5), rows_per_shard=16)
    with pytest.raises(RuntimeError, match=rf"checkpoint_step_00000004 is incomplete or damaged: .*{re.escape(name)}"):
        _run(tmp_path, "again", 2, restore=str(newer))
    if how != "flipped":
        assert find(str(run_dir)) == str(older)


def test_a_run_without_rays_record_resumes_from_its_newest_complete_checkpoint(runs, tmp_path):
    """A driver stopped between a worker's upload and Ray's record of it leaves checkpoints and no
    snapshot: the launch resumes from the newest complete one (never step 0), passing over torn ones."""
    from fmdist.train.launch import SNAPSHOT_FILE, resume_point

    cfg = from_dict({**_raw(2), "run": {"name": "run", "storage_path": str(tmp_path)}})
    run_dir = tmp_path / "run"
    assert resume_point(cfg) == (False, None)
    older, newer = run_dir / "checkpoint_step_00000002", run_dir / "checkpoint_step_00000004"
    shutil.copytree(runs(2, "paused"), older)
    shutil.copytree(runs(2, "whole"), newer)
    assert resume_point(cfg) == (False, str(newer))
    _tear(newer, "truncated")
    assert resume_point(cfg) == (False, str(older))
    _tear(older, "unfinished")
    assert resume_point(cfg) == (False, None)
    (run_dir / SNAPSHOT_FILE).write_text("{}")  # Ray Train's own record wins: it resumes itself
    assert resume_point(cfg) == (True, None)
