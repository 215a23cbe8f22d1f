"""Population Based Training over multi-worker DeepSpeed trials.

A PBT trial is a sequence of *rounds*: Train runs of `tune.perturbation_interval_steps` steps each
(`train(..., stop_at_step=...)`, the LR schedule spanning all of `train.max_steps`). At each round's
end the trial reports to Tune with a small pointer checkpoint naming the round's Train checkpoint
(the DeepSpeed shards, every rank's). When PBT tells a weak trial to copy a strong one, Tune restarts
the weak trial's function with the strong one's pointer; its next round loads those shards (ZeRO-3
included) with the weak trial's perturbed hyperparameters (loop.apply_hyperparameters).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from fmdist.config import Config, pbt_mutations

POINTER_FILE = "fmdist_pbt.json"
"""A PBT trial's Tune checkpoint: where its latest Train checkpoint lives and how the trial got there.

The DeepSpeed shards stay in the round's Train run directory; Tune copies only this file, so an
exploit moves no weights through Tune's storage (a ZeRO-3 checkpoint can be hundreds of GB)."""


class FinalRoundPBT(PopulationBasedTraining):
    """PBT that leaves a trial's last result alone.

    Ray's PBT would still exploit at `max_steps`, overwriting a finished trial's record with another
    trial's checkpoint and config without training a step more.
    """

    def __init__(self, max_steps: int, **kwargs: Any):
        super().__init__(**kwargs)
        self._max_steps = max_steps

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_steps:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


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
