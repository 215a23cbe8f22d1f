"""Population Based Training over multi-worker DeepSpeed trials.

A PBT trial is a sequence of *rounds*: Train runs of `tune.perturbation_interval_steps` steps each
(`train(..., stop_at_step=...)`, the LR schedule spanning all of `train.max_steps`). At each round's
end the trial reports to Tune with a small pointer checkpoint naming the round's Train checkpoint
(the DeepSpeed shards, every rank's). When PBT tells a weak trial to copy a strong one, Tune restarts
the weak trial's function with the strong one's pointer; its next round loads those shards (ZeRO-3
included) with the weak trial's perturbed hyperparameters (loop.apply_hyperparameters).

Storage: every round is a Train run directory of DeepSpeed shards under `trials/`. The scheduler deletes
the ones no trial can resume or copy any more (`FinalRoundPBT.collect_rounds`), so a search holds about
one round per trial instead of one per trial and round.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from fmdist.config import Config, pbt_mutations
from fmdist.data.fs import filesystem
from fmdist.runtime import get_logger

log = get_logger("fmdist.tune")

POINTER_FILE = "fmdist_pbt.json"
"""A PBT trial's Tune checkpoint: where its latest Train checkpoint lives and how the trial got there.

The DeepSpeed shards stay in the round's Train run directory; Tune copies only this file, so an
exploit moves no weights through Tune's storage (a ZeRO-3 checkpoint can be hundreds of GB)."""


def round_run(checkpoint_uri: str) -> str:
    """The round's Train run directory, from one of its checkpoints (`.../trials/<round>/checkpoint_step_N`)."""
    return checkpoint_uri.rstrip("/").rsplit("/", 1)[0]


def unreferenced_rounds(
    all_rounds: Iterable[str], live_pointers: Iterable[str | None], keep: Iterable[str | None] = ()
) -> list[str]:
    """The round runs in `all_rounds` that hold none of the checkpoints in `live_pointers` or `keep`, sorted.

    `all_rounds` are run URIs of rounds that trials have reported (a round still training has not been,
    so it is never a candidate); `live_pointers` and `keep` are checkpoint URIs (None is ignored).
    """
    needed = {round_run(uri) for uri in (*live_pointers, *keep) if uri}
    return sorted(set(all_rounds) - needed)


def delete_round(run_uri: str) -> None:
    """Delete a round's Train run directory (checkpoints, Ray Train's snapshot, config, metrics), local or s3://."""
    fs, path = filesystem(run_uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


class FinalRoundPBT(PopulationBasedTraining):
    """PBT that leaves a trial's last result alone and deletes the round runs that no trial needs.

    Ray's PBT would still exploit at `max_steps`, overwriting a finished trial's record with another
    trial's checkpoint and config without training a step more.

    Round runs are collected after every result and every trial's end (in the driver, where Tune keeps
    each trial's pointer: `trial.checkpoint`, which PBT's exploit sets to the donor's). A round run is kept
    while it holds the checkpoint of
    - a pointer Tune will restore an unfinished trial from (its next round, a retry, `--resume`), the
      donor's after an exploit, until that trial reports its next round;
    - a trial's latest reported round: a finished trial's final model (the leaderboard links it, and the
      best trial's is exported at the end), or a round whose pointer Tune has not registered yet.
    So at each round's end about one round per trial is left, plus the rounds donors have moved on from
    while their copiers still load them. Only reported rounds are ever deleted: never one in training.
    """

    def __init__(self, max_steps: int, **kwargs: Any):
        super().__init__(**kwargs)
        self._max_steps = max_steps
        self._rounds: set[str] = set()  # reported round runs not deleted yet: the only candidates
        self._latest: dict[str, str] = {}  # trial id -> checkpoint URI of its latest reported round
        self._pointed: dict[str, str | None] = {}  # Tune checkpoint path -> round checkpoint its pointer names

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self.record_round(trial.trial_id, result.get("checkpoint_uri"))
        if result.get(self._time_attr, 0) >= self._max_steps:
            decision = TrialScheduler.CONTINUE
        else:
            decision = super().on_trial_result(tune_controller, trial, result)
        # After the decision: an exploit has just pointed a weak trial at its donor's checkpoint.
        self.collect_rounds(tune_controller.get_trials())
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self.collect_rounds(tune_controller.get_trials())

    def record_round(self, trial_id: str, checkpoint_uri: str | None) -> None:
        """Note a trial's reported round (its result's `checkpoint_uri`)."""
        if checkpoint_uri:
            self._latest[trial_id] = checkpoint_uri
            self._rounds.add(round_run(checkpoint_uri))

    def _pointer_uri(self, checkpoint: tune.Checkpoint | None) -> str | None:
        if checkpoint is None:
            return None
        if checkpoint.path not in self._pointed:  # a pointer never changes: read each once
            self._pointed[checkpoint.path] = read_pointer(checkpoint)["checkpoint"]
        return self._pointed[checkpoint.path]

    def collect_rounds(self, trials: Iterable[Any]) -> list[str]:
        """Delete the reported round runs that no trial can resume or copy any more; returns them."""
        try:
            live = [self._pointer_uri(t.checkpoint) for t in trials if t.status != Trial.TERMINATED]
        except (OSError, ValueError, KeyError) as exc:
            # What is referenced is unknown, so nothing is deleted; the next result tries again.
            log.warning("PBT: round runs not collected this time: a trial's pointer could not be read (%s)", exc)
            return []
        removed = []
        for run in unreferenced_rounds(self._rounds, live, keep=self._latest.values()):
            try:
                delete_round(run)
            except OSError as exc:
                log.warning("PBT: could not delete round run %s (%s); trying again after the next result", run, exc)
                continue
            self._rounds.discard(run)
            removed.append(run)
        if removed:
            log.info("PBT: deleted %d round run(s) that no trial can resume or copy: %s", len(removed),
                     ", ".join(removed))  # fmt: skip
        return removed


def scheduler(cfg: Config, max_steps: int) -> FinalRoundPBT:
    from fmdist.tune.search import param_space

    space = param_space(cfg.tune.search_space)
    mutations = {}
    for key in pbt_mutations(cfg.tune):
        domain = space[key]
        # A grid sets the starting population; PBT then scales its values by 0.8 or 1.2, or redraws
        # one of them (given the list itself, Ray would only step along it, never between values).
        mutations[key] = tune.choice(domain["grid_search"]) if isinstance(domain, dict) else domain
    # Synchronous: every trial stops at the round's end, then the bottom quantile copies the top one,
    # so an exploit always takes a checkpoint from the same step.
    return FinalRoundPBT(
        max_steps,
        time_attr="step",
        perturbation_interval=cfg.tune.perturbation_interval_steps,
        hyperparam_mutations=mutations,
        quantile_fraction=cfg.tune.quantile_fraction,
        resample_probability=cfg.tune.resample_probability,
        synch=True,
    )


def read_pointer(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / POINTER_FILE).read_text())


def round_name(trial_id: str, step: int, restore_from: str | None, params: dict[str, Any]) -> str:
    """A round's Train run name: unique per (start checkpoint, hyperparameters).

    A retried or paused-and-resumed round has the same inputs, so it gets the same name and Ray Train
    resumes it from its own latest checkpoint; an exploit (new checkpoint, new values) starts a new run.
    """
    key = json.dumps([restore_from, params], sort_keys=True, default=str)
    return f"{trial_id}-s{step:06d}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str, max_steps: int) -> None:
    """One PBT trial (Tune's function trainable): rounds until `max_steps`, each reported with a pointer."""
    from fmdist.runtime import use_cpu_accelerator_if_no_gpu
    from fmdist.train.launch import train
    from fmdist.tune.search import trial_config

    use_cpu_accelerator_if_no_gpu()
    trial_id = tune.get_context().get_trial_id()
    checkpoint = tune.get_checkpoint()  # its own last round's, or a donor's after an exploit
    pointer = read_pointer(checkpoint) if checkpoint else {"checkpoint": None, "step": 0, "lineage": []}
    cfg = trial_config(base, params)
    cfg.run.storage_path = trials_dir
    interval = cfg.tune.perturbation_interval_steps
    while pointer["step"] < max_steps:
        start = pointer["step"]
        cfg.run.name = round_name(trial_id, start, pointer["checkpoint"], params)
        summary = train(cfg, restore_from=pointer["checkpoint"], stop_at_step=(start // interval + 1) * interval)
        if summary["step"] <= start:
            raise RuntimeError(f"PBT round {cfg.run.name} made no progress from step {start}; see its log.")
        segment = {
            "trial": trial_id,
            "run": cfg.run.name,
            "from_step": start,
            "to_step": summary["step"],
            "restored_from": pointer["checkpoint"],
            "checkpoint": summary["checkpoint"],
            "params": params,
            **{k: v for k, v in summary.items() if k.startswith(("restore/", "eval/")) and _is_number(v)},
        }
        pointer = {
            "checkpoint": summary["checkpoint"],
            "step": summary["step"],
            "lineage": [*pointer["lineage"], segment],
        }
        metrics = {k: v for k, v in summary.items() if _is_number(v)}
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / POINTER_FILE).write_text(json.dumps(pointer, indent=2, default=str))
            tune.report(
                {**metrics, "checkpoint_uri": summary["checkpoint"]},
                checkpoint=tune.Checkpoint.from_directory(directory),
            )
