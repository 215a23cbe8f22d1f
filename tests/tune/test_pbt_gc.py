"""PBT's collection of round runs: only rounds a trial can still resume or copy stay on disk.

No Ray cluster: a population reports rounds into a local directory tree the way Ray Tune and PBT do
(Tune registers a trial's pointer after the scheduler has seen its result; an exploit points the weak
trial at the donor's pointer), and the scheduler's `record_round` / `collect_rounds` run on fake trials.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from ray import tune

from fmdist.tune.pbt import POINTER_FILE, FinalRoundPBT, delete_round, round_run, unreferenced_rounds

INTERVAL = 10


def scheduler() -> FinalRoundPBT:
    return FinalRoundPBT(
        100, time_attr="step", perturbation_interval=INTERVAL, hyperparam_mutations={"train.lr": [1e-3]}, synch=True
    )


def trial(trial_id: str) -> SimpleNamespace:
    """What the scheduler reads of a Tune trial: its id, status and current pointer (a Tune checkpoint)."""
    return SimpleNamespace(trial_id=trial_id, status="RUNNING", checkpoint=None)


def train_round(root: Path, t: SimpleNamespace, step: int) -> str:
    """A finished round's Train run with one checkpoint of DeepSpeed shards; returns the checkpoint URI."""
    checkpoint = root / "trials" / f"{t.trial_id}-s{step - INTERVAL:06d}" / f"checkpoint_step_{step:08d}"
    (checkpoint / "ds").mkdir(parents=True)
    (checkpoint / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    return str(checkpoint)


def register_pointer(root: Path, t: SimpleNamespace, checkpoint_uri: str, step: int) -> None:
    """Tune stores the trial's pointer checkpoint and makes it the trial's latest."""
    directory = root / "search" / t.trial_id / f"checkpoint_{step:06d}"
    directory.mkdir(parents=True)
    (directory / POINTER_FILE).write_text(json.dumps({"checkpoint": checkpoint_uri, "step": step, "lineage": []}))
    t.checkpoint = tune.Checkpoint(str(directory))


def rounds_on_disk(root: Path) -> set[str]:
    return {str(p) for p in (root / "trials").iterdir()}


def pointed_rounds(trials: list[SimpleNamespace]) -> set[str]:
    """The round runs the trials' current pointers name."""
    pointers = [json.loads((Path(t.checkpoint.path) / POINTER_FILE).read_text()) for t in trials if t.checkpoint]
    return {round_run(pointer["checkpoint"]) for pointer in pointers}


def test_unreferenced_rounds_are_the_reported_rounds_no_pointer_or_kept_checkpoint_names():
    rounds = ["s3://b/trials/a-s000000", "s3://b/trials/a-s000010", "s3://b/trials/b-s000000"]
    live = ["s3://b/trials/a-s000010/checkpoint_step_00000020", None]
    keep = ["s3://b/trials/b-s000000/checkpoint_step_00000010/"]
    assert unreferenced_rounds(rounds, live, keep) == ["s3://b/trials/a-s000000"]
    assert unreferenced_rounds(rounds, [], []) == sorted(rounds)
    assert unreferenced_rounds([], live, keep) == []


def test_rounds_on_disk_stay_bounded_by_the_live_trials_as_rounds_go_on(tmp_path):
    pbt = scheduler()
    trials = [trial(f"t{i}") for i in range(3)]
    latest: dict[str, str] = {}
    removed = []
    for k in range(1, 7):
        step = k * INTERVAL
        # At the round's end the weakest trial copies the strongest; who is which changes every round.
        weak, donor = trials[k % 3], trials[(k + 1) % 3]
        for i, t in enumerate(trials):
            latest[t.trial_id] = train_round(tmp_path, t, step)
            pbt.record_round(t.trial_id, latest[t.trial_id])
            last = i == len(trials) - 1
            if last:
                # The round's last result triggers PBT's exploit before the collection; the donor's pointer
                # is resolved first when the donor is this very trial.
                if t is donor:
                    register_pointer(tmp_path, t, latest[t.trial_id], step)
                weak.checkpoint = donor.checkpoint
            removed += pbt.collect_rounds(trials)
            needed = pointed_rounds(trials) | {round_run(uri) for uri in latest.values()}
            # Every round a trial can resume or copy is there, and nothing else; mid-round a donor's old
            # round stays while its copier has not reported.
            assert rounds_on_disk(tmp_path) == needed
            assert len(needed) <= 2 * len(trials)
            if not (last and t is donor):
                register_pointer(tmp_path, t, latest[t.trial_id], step)  # Tune does it after the callback
        # At the round's end: one round per trial, and the last reporter's previous one until its pointer
        # is registered.
        assert len(rounds_on_disk(tmp_path)) <= len(trials) + 1, sorted(rounds_on_disk(tmp_path))
    assert len(removed) == 6 * 3 - len(rounds_on_disk(tmp_path))  # 18 rounds trained; the rest deleted


# The copier may be loading the donor's round (RUNNING), waiting to start (PAUSED), or failed and due for
# a retry or `--resume` (ERROR): in each case Tune restores it from the donor's pointer.
@pytest.mark.parametrize("copier_status", ["RUNNING", "PAUSED", "ERROR"])
def test_a_round_being_copied_is_kept_until_its_copier_reports_and_finished_trials_keep_their_model(
    tmp_path, copier_status
):
    pbt = scheduler()
    donor, copier = trial("donor"), trial("copier")
    trials = [donor, copier]
    first = {}
    for t in trials:
        first[t.trial_id] = train_round(tmp_path, t, 10)
        pbt.record_round(t.trial_id, first[t.trial_id])
        register_pointer(tmp_path, t, first[t.trial_id], 10)
    copier.checkpoint = donor.checkpoint  # PBT's exploit
    copier.status = copier_status
    assert pbt.collect_rounds(trials) == []

    # The donor finishes its next round while the copier still loads the donor's first one.
    donor_second = train_round(tmp_path, donor, 20)
    pbt.record_round("donor", donor_second)
    register_pointer(tmp_path, donor, donor_second, 20)
    assert pbt.collect_rounds(trials) == []
    assert Path(round_run(first["donor"])).is_dir()

    copier.status = "RUNNING"
    copier_second = train_round(tmp_path, copier, 20)
    pbt.record_round("copier", copier_second)
    assert pbt.collect_rounds(trials) == [round_run(first["copier"])]  # Tune still points it at the donor's
    register_pointer(tmp_path, copier, copier_second, 20)
    assert pbt.collect_rounds(trials) == [round_run(first["donor"])]

    for t in trials:
        t.status = "TERMINATED"
    assert pbt.collect_rounds(trials) == []
    assert rounds_on_disk(tmp_path) == {round_run(donor_second), round_run(copier_second)}


def test_an_unreadable_pointer_deletes_nothing(tmp_path):
    pbt = scheduler()
    a, b = trial("a"), trial("b")
    old = train_round(tmp_path, a, 10)
    pbt.record_round("a", old)
    new = train_round(tmp_path, a, 20)
    pbt.record_round("a", new)
    register_pointer(tmp_path, a, new, 20)
    b.checkpoint = tune.Checkpoint(str(tmp_path / "search" / "b" / "gone"))
    assert pbt.collect_rounds([a, b]) == []
    assert Path(round_run(old)).is_dir()


def test_delete_round_removes_one_run_directory_locally(tmp_path):
    runs = [tmp_path / "trials" / name for name in ("t-s000010", "t-s000010-x", "t-s000020")]
    for run in runs:
        (run / "checkpoint_step_00000010").mkdir(parents=True)
        (run / "checkpoint_step_00000010" / "shard.pt").write_bytes(b"weights")
    delete_round(str(runs[0]))
    delete_round(str(runs[0]))  # already gone: nothing to do
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["t-s000010-x", "t-s000020"]


def test_delete_round_removes_one_run_prefix_on_s3(s3_bucket):
    s3 = boto3.client("s3")
    names = ["runs/x/trials/t-s000010/checkpoint_step_00000010/ds/shard.pt", "runs/x/trials/t-s000010/metrics.json",
             "runs/x/trials/t-s000010-x/metrics.json", "runs/x/trials/t-s000020/metrics.json"]  # fmt: skip
    for key in names:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    delete_round(f"s3://{s3_bucket}/runs/x/trials/t-s000010")
    delete_round(f"s3://{s3_bucket}/runs/x/trials/t-s000010")
    # pyarrow leaves an empty marker object for the parent directory (`runs/x/trials/`); no data.
    objects = s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    left = sorted(o["Key"] for o in objects if not (o["Key"].endswith("/") and o["Size"] == 0))
    assert left == ["runs/x/trials/t-s000010-x/metrics.json", "runs/x/trials/t-s000020/metrics.json"]
