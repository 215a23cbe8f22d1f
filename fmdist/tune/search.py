"""`fmdist tune`: a Ray Tune search whose every trial is a multi-worker DeepSpeed run (a TorchTrainer).

Each trial applies its sampled values as `section.field` overrides to the run's config and goes
through the same validation as `fmdist train`, so an invalid sample fails that trial with the
config error instead of the search. Trials report through Ray Train's Tune callback, so ASHA sees
every evaluation (`step` is its time axis).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import os
import tempfile
import time
from typing import Any

import pyarrow.fs as pafs
import yaml

from fmdist.config import Config, ConfigError, apply_overrides, from_dict
from fmdist.data.fs import filesystem
from fmdist.runtime import get_logger

log = get_logger("fmdist.tune")
TRIALS_DIR = "trials"
TRIAL_CPU = 1  # the trial's own process, which drives its TorchTrainer
# AWS keys that Ray Tune would copy from the driver's environment into every trial actor's runtime env.
AWS_CREDENTIAL_ENV = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}
)


def keep_credentials_out_of_trial_envs() -> None:
    """Stop Ray Tune from copying the driver's AWS keys into its trials' runtime envs.

    Ray Tune (ray/tune/execution/class_cache.py) puts them into every trial actor's runtime_env
    env_vars, which the dashboard, the Jobs and state APIs and runtime_env_agent.log show in plain
    text; the trials' Train workers inherit them. Trials, like workers, get credentials from their
    node's own chain (the raylet's environment, an instance role) without them.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - AWS_CREDENTIAL_ENV


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` as text; numbers in search spaces are numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def param_space(search_space: dict[str, Any]) -> dict[str, Any]:
    """The `tune.search_space` section as Ray Tune domains, keyed by dotted config key."""
    from ray import tune

    out = {}
    for key, spec in search_space.items():
        kind, args = next(iter(spec.items()))
        args = [_number(a) for a in args]
        out[key] = {
            "loguniform": lambda a: tune.loguniform(a[0], a[1]),
            "uniform": lambda a: tune.uniform(a[0], a[1]),
            "quniform": lambda a: tune.quniform(a[0], a[1], a[2]),
            "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
        }[kind](args)
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with a trial's values applied, validated like `fmdist train`'s."""
    raw = apply_overrides(copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in params.items()])
    return from_dict(raw, source="this trial's sampled values")


def _trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str) -> None:
    """One trial: a whole fmdist training run with the sampled values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from fmdist.runtime import use_cpu_accelerator_if_no_gpu
    from fmdist.train.launch import train

    use_cpu_accelerator_if_no_gpu()
    cfg = trial_config(base, params)
    cfg.run.name = tune.get_context().get_trial_id()  # the leaderboard's trial column names this run
    cfg.run.storage_path = trials_dir
    train(cfg, callbacks=[TuneReportCallback()])


def concurrency(cfg: Config) -> tuple[int, str]:
    """How many trials fit at once on this cluster, and the reason, printed for the user."""
    import ray

    resources = ray.cluster_resources()
    # A trial takes its workers' CPUs plus one for its own process (the TorchTrainer's driver), and
    # one CPU of the cluster stays free for Ray Data's read tasks, or the trials' streams stall.
    per_trial_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + TRIAL_CPU
    fits = int((resources.get("CPU", 0) - 1) // per_trial_cpu)
    why = (
        f"the cluster has {resources.get('CPU', 0):g} CPUs, one kept for data tasks, and a trial takes "
        f"{per_trial_cpu:g} ({cfg.scaling.num_workers} workers + 1 for the trial)"
    )
    gpus = resources.get("GPU", 0)
    if gpus and cfg.scaling.use_gpu is not False:
        per_trial_gpu = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
        if gpus // per_trial_gpu < fits:
            fits = int(gpus // per_trial_gpu)
            why = (
                f"the cluster has {gpus:g} GPUs and a trial's {cfg.scaling.num_workers} workers take {per_trial_gpu:g}"
            )
    if cfg.tune.max_concurrent_trials is not None and cfg.tune.max_concurrent_trials < fits:
        return cfg.tune.max_concurrent_trials, f"tune.max_concurrent_trials is {cfg.tune.max_concurrent_trials}"
    if fits < 1:
        raise RuntimeError(f"no trial fits: {why}. Lower scaling.num_workers or add nodes.")
    return fits, why


def _scheduler(cfg: Config, max_steps: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "pbt":
        from fmdist.tune.pbt import scheduler

        return scheduler(cfg, max_steps)
    if cfg.tune.scheduler == "asha":
        return ASHAScheduler(
            time_attr="step",
            max_t=max_steps,
            grace_period=cfg.tune.grace_period_steps,
            reduction_factor=cfg.tune.reduction_factor,
        )
    return FIFOScheduler()


def _search_alg(cfg: Config, max_concurrent: int) -> Any:
    """The searcher, limited to `max_concurrent` live trials.

    The limit must sit on the searcher itself: a trial started beyond what fits holds its own CPU
    while its TorchTrainer waits for workers that never come (the PENDING deadlock of ray#38505).
    """
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=max_concurrent)


def leaderboard(results: Any, cfg: Config) -> list[dict[str, Any]]:
    """Every trial: its values, status, best metric, steps, compute in worker-seconds; best first."""
    rows = []
    sign = 1 if cfg.tune.mode == "max" else -1
    for result in results:
        history = result.metrics_dataframe
        values = (
            history[cfg.tune.metric].dropna().tolist() if history is not None and cfg.tune.metric in history else []
        )
        best = (max if sign > 0 else min)(values) if values else None
        metrics = result.metrics or {}
        lineage = []
        if result.checkpoint is not None and cfg.tune.scheduler == "pbt":
            from fmdist.tune.pbt import read_pointer

            lineage = read_pointer(result.checkpoint)["lineage"]
        rows.append(
            {
                "trial": metrics.get("trial_id") or os.path.basename(result.path),
                "status": "ERROR" if result.error else "DONE",
                "error": error_line(result.error) if result.error else "",
                "best_metric": best,
                "final_metric": values[-1] if values else None,
                "steps": metrics.get("step"),
                "worker_seconds": round(metrics.get("time_total_s", 0) * cfg.scaling.num_workers, 1),
                "config": {k: v for k, v in (result.config or {}).items()},
                "checkpoint": metrics.get("checkpoint_uri"),
                "lineage": lineage,
                # time_s: the trial's own seconds (Tune's time_total_s) when it reported this value.
                "history": [
                    {"step": int(s), cfg.tune.metric: float(m), "time_s": round(float(t), 2)}
                    for s, m, t in zip(history["step"], history[cfg.tune.metric], history["time_total_s"], strict=True)
                    if not math.isnan(m)
                ]
                if values
                else [],
            }
        )
    rows.sort(key=lambda r: (r["best_metric"] is None, -sign * (r["best_metric"] or 0)))
    return rows


def error_line(error: BaseException) -> str:
    """The cause of a trial's error in one line: the traceback's last line (the first names only the
    Ray actor that raised it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def plot(rows: list[dict[str, Any]], metric: str, max_steps: int, path: str) -> None:
    """Metric against step for every trial; trials stopped early end with an x before max_steps, and a
    PBT trial that copied another's checkpoint shows a diamond at the donor's value where it did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if not row["history"]:
            continue
        steps = [h["step"] for h in row["history"]]
        values = [h[metric] for h in row["history"]]
        lineage = row.get("lineage") or []
        if lineage and all(metric in segment for segment in lineage):
            # PBT: the path of the model this trial ended with, through any trial it copied (Tune keeps
            # only the trial's own results since its last exploit).
            steps = [segment["to_step"] for segment in lineage]
            values = [segment[metric] for segment in lineage]
        label = (
            row["trial"]
            + " "
            + " ".join(
                f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                for k, v in row["config"].items()
            )
        )
        (line,) = ax.plot(steps, values, marker="o", markersize=3, label=label)
        if steps[-1] < max_steps:
            ax.plot(steps[-1], values[-1], marker="x", markersize=10, color=line.get_color())
        for before, segment in itertools.pairwise(lineage):
            if segment["trial"] == row["trial"] and before["trial"] != row["trial"] and metric in before:
                ax.plot(before["to_step"], before[metric], marker="D", markersize=7, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (x: stopped early; diamond: copied a stronger trial)")
    ax.axvline(max_steps, color="grey", linewidth=0.5, linestyle="--")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SearchInterrupted(RuntimeError):
    """The driver was stopped (Ctrl+C, SIGINT) before every trial ended; `--resume` continues it."""


def tune_run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search; writes leaderboard, best.yaml, plot and the best model to the run dir."""
    from ray import tune

    from fmdist.data.stream import total_steps, train_plan
    from fmdist.train.export import export
    from fmdist.train.launch import cache_dir, ensure_ray, open_data, write_run_file

    if not cfg.tune.search_space:
        raise ConfigError(
            ["tune.search_space: empty; give at least one key, e.g. train.lr: {loguniform: [1e-5, 1e-3]}."]
        )
    pbt = cfg.tune.scheduler == "pbt"
    # PBT compares trials that run at once: a local Ray gets logical CPUs for a population of two.
    ensure_ray(cfg, trials_at_once=2 if pbt else 1)
    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    trials_dir = f"{run_dir}/{TRIALS_DIR}"
    # Trials share the driver's cache of prepared inputs (prepared here, once, before any trial starts).
    cfg.data.cache_dir = cache_dir(cfg)
    sources = open_data(copy.deepcopy(cfg))
    base = cfg.to_dict()
    fits, why = concurrency(cfg)
    log.info("search %s: %d sample(s), %d trial(s) at a time because %s; more wait as PENDING", run_dir,
             cfg.tune.num_samples, fits, why)  # fmt: skip
    if pbt and fits < 2:
        raise RuntimeError(f"PBT needs at least 2 trials running at once to compare, but {why}; lower "
                           "scaling.num_workers, raise tune.max_concurrent_trials, or add nodes.")  # fmt: skip
    if pbt and cfg.tune.num_samples > fits:
        log.warning("PBT: the population is the %d trials that run at once; the other %d start as those finish "
                    "and are compared among themselves", fits, cfg.tune.num_samples - fits)  # fmt: skip
    # The same step plan as the trials' loops (ASHA's max_t, the plot's axis).
    max_steps = total_steps(cfg, train_plan(cfg, sources["train"], cfg.scaling.num_workers))
    if pbt:
        from fmdist.tune.pbt import trial as pbt_trial

        trainable = tune.with_parameters(pbt_trial, base=base, trials_dir=trials_dir, max_steps=max_steps)
    else:
        trainable = tune.with_parameters(_trial, base=base, trials_dir=trials_dir)
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
    fs, path = filesystem(cfg.run.storage_path)
    storage_fs = None if fs.type_name == "local" else fs
    storage_path = cfg.run.storage_path if storage_fs is None else path
    tune_dir = f"{storage_path.rstrip('/')}/{cfg.run.name}/search"
    if resume:
        if not tune.Tuner.can_restore(tune_dir, storage_filesystem=storage_fs):
            raise RuntimeError(f"--resume: no search to resume at {run_dir}/search; drop --resume to start one.")
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg.tune.search_space),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                num_samples=cfg.tune.num_samples,
                scheduler=_scheduler(cfg, max_steps),
                search_alg=_search_alg(cfg, fits),
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=f"{storage_path.rstrip('/')}/{cfg.run.name}",
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures_per_trial),
            ),
        )
    keep_credentials_out_of_trial_envs()
    t0 = time.perf_counter()
    results = tuner.fit()
    search_wall_s = time.perf_counter() - t0
    # A trial that ended (completed, stopped by its scheduler, or errored) is TERMINATED or ERROR; one
    # stopped by an interrupt is not, and trials the searcher never started are missing altogether. (Not
    # `done` in the last result: Tune may save a finished trial's state before that flag is set, so a
    # trial restored by --resume can lack it; seen in CI.)
    expected = cfg.tune.num_samples * math.prod(
        len(spec["grid"]) for spec in cfg.tune.search_space.values() if "grid" in spec
    )
    ended = results.num_terminated + results.num_errors
    if ended < expected:
        raise SearchInterrupted(
            f"search {run_dir} stopped with {ended} of {expected} trial(s) ended; its state is "
            "saved. Continue it with the same command plus --resume (finished trials are not run again)."
        )
    rows = leaderboard(results, cfg)
    write_run_file(cfg, "leaderboard.json", json.dumps(rows, indent=2, default=str))
    fields = ["trial", "status", "best_metric", "steps", "worker_seconds", *cfg.tune.search_space, "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **row["config"]})
    write_run_file(cfg, "leaderboard.csv", buf.getvalue())
    print(format_leaderboard(rows, cfg))
    done = [r for r in rows if r["best_metric"] is not None]
    summary: dict[str, Any] = {"run_dir": run_dir, "leaderboard": rows, "search_wall_s": search_wall_s}
    if not done:
        raise RuntimeError(f"no trial reported {cfg.tune.metric}; see {run_dir}/leaderboard.csv for the errors.")
    best = done[0]
    best_cfg = trial_config(base, best["config"])
    best_cfg.run.name = f"{cfg.run.name}-best"
    best_cfg.tune = type(best_cfg.tune)()
    header = ""
    if pbt:
        header = (
            "# PBT: the best trial's hyperparameters at its end. Its model was trained with a schedule of values\n"
            "# and copied checkpoints (leaderboard.json has its lineage), so a fresh run of this file is a\n"
            "# baseline, not a reproduction; best-model/ is that trial's model.\n"
        )
    write_run_file(cfg, "best.yaml", header + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    with tempfile.TemporaryDirectory() as scratch:
        png = os.path.join(scratch, "trials.png")
        plot(rows, cfg.tune.metric, max_steps, png)
        fs, path = filesystem(f"{run_dir}/trials.png")
        with open(png, "rb") as src, fs.open_output_stream(path) as dst:
            dst.write(src.read())
    # A PBT trial's model is its last round's checkpoint; other trials are one Train run named by trial.
    # export() writes a local directory: through a scratch one, so that an s3:// run directory gets it too.
    with tempfile.TemporaryDirectory(prefix="fmdist-best-model-") as scratch:
        export(best["checkpoint"] or f"{trials_dir}/{best['trial']}", scratch)
        fs, path = filesystem(f"{run_dir}/best-model")
        fs.create_dir(path, recursive=True)
        pafs.copy_files(scratch, path, destination_filesystem=fs)
    summary.update(best=best, best_yaml=f"{run_dir}/best.yaml", best_model=f"{run_dir}/best-model")
    return summary


def _show(value: Any) -> str:
    """A config value in full, floats to 4 significant digits (lr 8.101237e-05 prints as 8.101e-05)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_leaderboard(rows: list[dict[str, Any]], cfg: Config) -> str:
    keys = list(cfg.tune.search_space)
    widths = {k: max(len(k), *(len(_show(r["config"].get(k))) for r in rows)) for k in keys}
    head = f"{'#':>3} {'trial':<28}{'status':<8}{cfg.tune.metric:>16}{'steps':>7}{'worker-s':>10}  "
    lines = [f"leaderboard ({cfg.tune.mode} {cfg.tune.metric})", head + "  ".join(f"{k:<{widths[k]}}" for k in keys)]
    for i, r in enumerate(rows, 1):
        metric = f"{r['best_metric']:.4f}" if r["best_metric"] is not None else "-"
        values = "  ".join(f"{_show(r['config'].get(k)):<{widths[k]}}" for k in keys)
        lines.append(
            f"{i:>3} {r['trial'][:27]:<28}{r['status']:<8}{metric:>16}{r['steps'] or 0:>7}{r['worker_seconds']:>10}  {values}"
        )
    return "\n".join(lines)
