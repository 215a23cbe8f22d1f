"""Federated fine-tuning: Flower's strategies aggregate clients that each run fmdist's own loop, on Ray.

`fmdist federate CONFIG` deals the training rows into `federate.num_clients` disjoint partitions
(iid, Dirichlet-skewed over the label, or by a column), then runs `federate.rounds` rounds in Flower's
simulation engine on its Ray backend: each round Flower's strategy (FedAvg, FedProx or FedAdam, wrapped
in Flower's fixed-clipping DP when `federate.dp` asks) samples clients, each sampled client fine-tunes
the global weights on its own rows with `fmdist.train.loop.fit` (one rank, world size 1, gloo, a
DeepSpeed ZeRO-0 engine, peft adapters when `peft:` asks, so that only the trainable weights travel),
and the strategy aggregates what they send back. The driver evaluates the global model after every
round on the eval split with the task's own metrics, logs one line per round, writes
`<run>/federated.json`, and saves the final global model as a normal fmdist checkpoint in the run
directory, so `fmdist export` and `fmdist eval` work on it unchanged.

Why Flower's engine and not our own actors: Flower 1.42's Ray backend runs on Ray 2.60 when flwr is
installed without its `simulation` extra (which pins ray 2.55.1); docs/federated.md has the evidence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from fmdist import tasks
from fmdist.config import Config, ConfigError, from_dict
from fmdist.data.fs import aws_env, filesystem
from fmdist.data.sources import PROVENANCE_FILE, Source, iter_tables, provenance, resolve
from fmdist.data.stream import EpochStreams, eval_batches
from fmdist.predict import metrics_over
from fmdist.runtime import get_logger

log = get_logger("fmdist.federate")

CLIENTS_DIR = "clients"
RESULTS_FILE = "federated.json"
ROWS_PER_SHARD = 256
"""Row-group size of a client's partition file: each row group is a shard the stream shuffles over."""
RAY_START_ATTEMPTS = 3
"""Tries at starting a local Ray: on an overloaded machine its raylet may miss Ray's fixed start-up deadline."""
_NO_MID_RUN_CHECKPOINTS = 10**9
"""run.checkpoint_every_steps for a client's fit: its one checkpoint (at the end) is scratch, never read."""


# ---- partitions: which rows each client holds


def iid_partition(num_rows: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffled rows dealt into `num_clients` shares whose sizes differ by at most one."""
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Each label's rows split across clients by proportions drawn from Dirichlet(alpha) (Hsu et al. 2019).

    Small alpha gives each client mostly one or two labels; large alpha approaches iid.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for client, chunk in enumerate(np.split(rows, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def column_partition(values: list[Any], num_clients: int) -> tuple[list[np.ndarray], list[list[Any]]]:
    """One client per value of a column; with more values than clients, values are grouped (largest
    first, each to the client holding the fewest rows so far). Returns the rows and each client's values."""
    array = np.asarray([str(v) for v in values])
    distinct, counts = np.unique(array, return_counts=True)
    sizes = [0] * num_clients
    owned: list[list[Any]] = [[] for _ in range(num_clients)]
    for value, count in sorted(zip(distinct.tolist(), counts.tolist(), strict=True), key=lambda vc: (-vc[1], vc[0])):
        client = min(range(num_clients), key=lambda c: (sizes[c], c))
        sizes[client] += count
        owned[client].append(value)
    parts = [np.flatnonzero(np.isin(array, values)) for values in owned]
    return parts, owned


def partition(cfg: Config, table: pa.Table) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The rows of `table` each client holds, per `cfg.federate`, and a description for the results.

    Raises:
        ConfigError: the column is missing (listing the columns), it has fewer values than clients, or
            a client would hold no rows (naming the setting to change).
    """
    f = cfg.federate
    if table.num_rows < f.num_clients:
        raise ConfigError(
            [
                f"federate.num_clients: {f.num_clients} clients for {table.num_rows} training rows leaves some "
                f"client empty; use at most {table.num_rows} clients."
            ]
        )
    info: dict[str, Any] = {"partition": f.partition}
    if f.partition == "iid":
        parts = iid_partition(table.num_rows, f.num_clients, f.seed)
    elif f.partition == "dirichlet":
        parts = dirichlet_partition(np.asarray(table.column(cfg.data.label_column)), f.num_clients, f.alpha, f.seed)
        info["alpha"] = f.alpha
    else:
        if f.column not in table.column_names:
            raise ConfigError(
                [
                    f"federate.column: {f.column!r} is not a column of data.train ({cfg.data.train}); its columns "
                    f"are {table.column_names}. Set federate.column to one of them."
                ]
            )
        values = table.column(f.column).to_pylist()
        distinct = len(set(map(str, values)))
        if distinct < f.num_clients:
            raise ConfigError(
                [
                    f"federate.num_clients: column {f.column!r} has {distinct} distinct value(s), fewer than "
                    f"{f.num_clients} clients, so some client would be empty; set federate.num_clients={distinct}."
                ]
            )
        parts, owned = column_partition(values, f.num_clients)
        info.update(column=f.column, values=owned)
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(
            [
                f"federate.alpha: Dirichlet({f.alpha}) left client(s) {empty} of {f.num_clients} with no rows; raise "
                "federate.alpha (e.g. 0.5), use fewer clients, or change federate.seed."
            ]
        )
    return parts, info


def label_counts(cfg: Config, table: pa.Table, parts: list[np.ndarray]) -> list[dict[str, int]] | None:
    """Each client's rows per label name (None for unlabelled tasks): the skew, for the results."""
    if not tasks.get(cfg.model.task).labelled:
        return None
    labels = np.asarray(table.column(cfg.data.label_column))
    names = cfg.model.label_names
    return [
        {names[int(k)]: int(v) for k, v in zip(*np.unique(labels[part], return_counts=True), strict=True)}
        for part in parts
    ]


def write_partitions(table: pa.Table, parts: list[np.ndarray], run_uri: str) -> list[str]:
    """Each client's rows as a Parquet file under `<run>/clients/client_NNN/`; returns the directories."""
    fs, root = filesystem(f"{run_uri}/{CLIENTS_DIR}")
    uris = []
    for client, rows in enumerate(parts):
        path = f"{root}/client_{client:03d}"
        fs.create_dir(path, recursive=True)
        pq.write_table(table.take(pa.array(rows)), f"{path}/part-00000.parquet", filesystem=fs,
                       row_group_size=ROWS_PER_SHARD)  # fmt: skip
        uris.append(f"{run_uri}/{CLIENTS_DIR}/client_{client:03d}")
    return uris


# ---- one client's local training: fmdist's loop with the global weights and FedProx's term


def client_config(cfg: Config) -> Config:
    """A client's fit: one rank with a plain (ZeRO-0) DeepSpeed engine, `federate.local_*` of training.

    train.seed stays the run's: under peft every client must build the same frozen base (a from_config
    model's base weights come from the seed), and the driver builds it the same way.
    """
    raw = cfg.to_dict()
    raw["scaling"].update(num_workers=1)
    raw["deepspeed"].update(zero_stage=0, offload_optimizer="none", offload_params="none")
    raw["train"].update(epochs=cfg.federate.local_epochs, max_steps=cfg.federate.local_steps, eval_every_steps=None)
    raw["run"].update(checkpoint_every_steps=_NO_MID_RUN_CHECKPOINTS)
    raw["report"].update(enabled=False)
    return from_dict(raw)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What travels between server and clients: the trainable parameters (with peft, adapters and head)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; every one must be given, nothing else."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(
            f"global weights do not match the client's trainable parameters: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; clients and server must build the model with the same model and peft sections."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.dtype))


def add_proximal_term(model: torch.nn.Module, global_state: dict[str, torch.Tensor], mu: float) -> None:
    """FedProx (Li et al. 2020): add mu/2 * ||w - w_global||^2 over the trainable weights to the model's own
    loss (`output.loss`) in training mode.

    A forward hook, so the term goes through the loop's loss as it is: DeepSpeed scales it with the
    accumulation and clips it with the rest, and a placeholder batch (run in eval mode, loss x 0) adds
    nothing. Evaluation (eval mode) reports the task's loss alone.
    """
    anchors = [(p, global_state[name].to(p.device, p.dtype)) for name, p in model.named_parameters() if p.requires_grad]

    def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if module.training and getattr(output, "loss", None) is not None:
            output.loss = output.loss + 0.5 * mu * sum(((p - g) ** 2).sum() for p, g in anchors)
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def train_client(
    cfg: Config, client_uri: str, global_state: dict[str, torch.Tensor], mu: float
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One client's round: fit from the global weights on its own rows; returns its weights and metrics.

    Runs in-process (tests) or in a Flower client actor, where the actor's next round reuses the process:
    the one-rank gloo group is created by the first fit and joined by the next (loop._init_distributed).
    """
    import torch.distributed as dist

    from fmdist.train.loop import LoopIO, fit

    if not dist.is_initialized():
        # Several client actors share a machine, and may inherit a port another process holds: take a free one.
        os.environ["MASTER_PORT"] = _free_port()
    ccfg = client_config(cfg)
    source = resolve(client_uri)
    stream = EpochStreams(ccfg, source, rank=0, world_size=1)
    built: list[torch.nn.Module] = []

    def prepare(model: torch.nn.Module) -> None:
        load_trainable(model, global_state)
        if mu > 0:
            add_proximal_term(model, global_state, mu)
        built.append(model)

    scratch = tempfile.mkdtemp(prefix="fmdist-client-")
    try:
        io = LoopIO(
            train_batches=stream.batches,
            iters_per_epoch=stream.iters_per_epoch,
            num_train_rows=source.manifest["total_rows"],
            report=lambda metrics, path: None,  # the only checkpoint (the last) is scratch: weights travel instead
            scratch_dir=scratch,
            data_state=stream.state,
            prepare_model=prepare,
        )
        summary = fit(ccfg, io)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # ZeRO-0 in fp32 steps the module's own parameters, so the built model holds the trained weights.
    trained = trainable_state(built[0])
    metrics = {
        "num-examples": float(source.manifest["total_rows"]),
        "train_loss": float(summary["train/loss"]),
        "first_loss": float(summary["train/first_loss"]),
        "steps": float(summary["step"]),
        "time_s": float(summary["train/time_s"]),
    }
    return {name: trained[name] for name in global_state}, metrics


# ---- the server side: Flower strategy, global evaluation, results


def make_strategy(cfg: Config, on_train_replies: Callable[[list[Any]], None] | None = None) -> Any:
    """Flower's strategy for `cfg.federate` (FedAvg, FedProx or FedAdam, optionally in a DP wrapper).

    `on_train_replies` sees every round's client replies (their MetricRecords) before Flower averages
    their metrics: the per-client rows and losses for the results.
    """
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
        FedAdam,
        FedAvg,
        FedProx,
    )
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    f = cfg.federate
    sampled = f.clients_per_round or f.num_clients

    def train_metrics(records: list[Any], weight_key: str) -> Any:
        if on_train_replies is not None:
            on_train_replies(records)
        return aggregate_metricrecords(records, weight_key)

    common = dict(
        fraction_train=sampled / f.num_clients,
        fraction_evaluate=0.0,  # the server evaluates the global model itself (evaluate_fn)
        min_train_nodes=sampled,
        min_available_nodes=f.num_clients,
        train_metrics_aggr_fn=train_metrics,
    )
    if f.strategy == "fedprox":
        strategy = FedProx(proximal_mu=f.proximal_mu, **common)
    elif f.strategy == "fedadam":
        strategy = FedAdam(eta=f.server_lr, tau=f.server_tau, **common)
    else:
        strategy = FedAvg(**common)
    if f.dp == "server":
        return DifferentialPrivacyServerSideFixedClipping(strategy, f.dp_noise_multiplier, f.dp_clipping_norm, sampled)
    if f.dp == "client":
        return DifferentialPrivacyClientSideFixedClipping(strategy, f.dp_noise_multiplier, f.dp_clipping_norm, sampled)
    return strategy


def reply_content(state: dict[str, torch.Tensor], metrics: dict[str, float]) -> Any:
    """A client's reply to a train message: its weights and its metrics (`num-examples` weighs the average)."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})


def make_client_app(cfg: Config, client_uris: list[str]) -> Any:
    """The Flower ClientApp: a train message -> `train_client` on that node's partition -> a reply."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod

    app = ClientApp(mods=[fixedclipping_mod] if cfg.federate.dp == "client" else None)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        config = msg.content["config"]
        state, metrics = train_client(
            cfg, client_uris[client], msg.content["arrays"].to_torch_state_dict(), float(config.get("proximal-mu", 0.0))
        )
        metrics["client"] = float(client)
        return Message(reply_content(state, metrics), reply_to=msg)

    return app


def global_model(cfg: Config) -> torch.nn.Module:
    """The model every client builds (same seed, same adapters): the initial global weights come from it."""
    from fmdist.train import adapters

    torch.manual_seed(cfg.train.seed)
    model = tasks.get(cfg.model.task).build_model(cfg)
    if adapters.enabled(cfg):
        model = adapters.apply(model, cfg, total_steps=1)
    return model


def _ensure_ray(cfg: Config) -> None:
    """Join the cluster (RAY_ADDRESS) or start a local Ray sized for the clients that train at once."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    at_once = min(cfg.federate.clients_per_round or cfg.federate.num_clients, cfg.scaling.num_workers)
    # Flower makes as many client actors as the cluster's CPUs hold: this many train at once.
    kwargs = dict(num_cpus=max(1, int(at_once * cfg.scaling.cpus_per_worker)), log_to_driver=True,
                  runtime_env={"env_vars": aws_env()})  # fmt: skip
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:
            # Ray 2.60 gives a new node's raylet a fixed 30 s to register with the GCS (ray/_private/node.py,
            # `raylet_start_wait_time_s`, no setting changes it); on a machine loaded far past its cores that
            # start fails though nothing is wrong. Stop what the failed start spawned, then try again.
            if "timed out during startup" not in str(exc) or attempt == RAY_START_ATTEMPTS:
                raise
            log.warning("Ray start %d/%d timed out (%s); retrying", attempt, RAY_START_ATTEMPTS, exc)
            ray.shutdown()
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    with contextlib.suppress(psutil.NoSuchProcess):  # it may have exited since the listing
                        child.kill()


def save_final_checkpoint(
    cfg: Config, state: dict[str, torch.Tensor], train: Source, evaluation: Source, run_uri: str
) -> tuple[str, dict[str, Any]]:
    """The final global model as a normal fmdist checkpoint in the run directory (`fmdist export` reads it).

    fmdist's own loop writes it: a client-shaped fit that stops at step 0 after loading the global
    weights, evaluating them (the loop's evaluation) and checkpointing. Returns its URI and that evaluation.
    """
    import torch.distributed as dist

    from fmdist.train.checkpoint import CHECKPOINT_PREFIX
    from fmdist.train.loop import LoopIO, fit

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = _free_port()
    ccfg = client_config(cfg)
    stream = EpochStreams(ccfg, train, rank=0, world_size=1)
    saved: list[str] = []
    scratch = tempfile.mkdtemp(prefix="fmdist-federate-")
    try:
        io = LoopIO(
            train_batches=stream.batches,
            iters_per_epoch=stream.iters_per_epoch,
            num_train_rows=train.manifest["total_rows"],
            report=lambda metrics, path: saved.append(path) if path else None,
            scratch_dir=scratch,
            eval_batches=lambda: eval_batches(evaluation, 0, 1, ccfg.train.micro_batch_size),
            stop_at_step=0,
            prepare_model=lambda model: load_trainable(model, state),
        )
        summary = fit(ccfg, io)
        uri = f"{run_uri}/{CHECKPOINT_PREFIX}{cfg.federate.rounds:08d}"
        fs, path = filesystem(uri)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        pafs.copy_files(saved[-1], path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return uri, summary["eval"]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics["scalars"].items()}


def federate(cfg: Config) -> dict[str, Any]:
    """Run `cfg.federate.rounds` federated rounds; returns the results (also written to <run>/federated.json).

    Raises:
        ConfigError: the data does not suit the partition (see `partition`), or there is no eval split.
        RuntimeError: a round in which no sampled client returned weights (the clients' errors are logged).
    """
    import yaml
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fmdist.train.launch import open_data, resolve_use_gpu, run_dir_uri, write_run_file

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage pings: no network here, none wanted
    started = time.time()
    f = cfg.federate
    sources = open_data(cfg)
    if "eval" not in sources:
        raise ConfigError(
            ["data.eval: federate evaluates the global model after every round; set data.eval or data.eval_fraction."]
        )
    run_uri = run_dir_uri(cfg)
    table = pa.concat_tables(iter_tables(sources["train"]))
    parts, info = partition(cfg, table)
    info["rows"] = [int(len(p)) for p in parts]
    info["labels"] = label_counts(cfg, table, parts)
    client_uris = write_partitions(table, parts, run_uri)
    write_run_file(cfg, "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    record = {split: provenance(source) for split, source in sources.items()}
    record["hardware"] = f"{f.num_clients} simulated clients (Flower on Ray), one rank each"
    write_run_file(cfg, PROVENANCE_FILE, json.dumps(record, indent=2, default=str))
    sampled = f.clients_per_round or f.num_clients
    log.info(
        "federating %s (%s) over %d clients (%s partition, rows %s), %d per round, %d rounds, %s%s",
        cfg.model.name_or_path, cfg.model.task, f.num_clients, f.partition, info["rows"], sampled, f.rounds,
        f.strategy, f", DP {f.dp}-side clipping" if f.dp != "none" else "",
    )  # fmt: skip

    model = global_model(cfg)
    processor = tasks.get(cfg.model.task).load_processor(cfg.model.tokenizer or cfg.model.name_or_path)
    headline = tasks.get(cfg.model.task).labelled and "accuracy" or "loss"
    rounds: list[dict[str, Any]] = []
    replies: list[dict[str, float]] = []  # this round's client metrics, between aggregation and evaluation
    server_error: list[BaseException] = []

    def on_train_replies(records: list[Any]) -> None:
        replies[:] = [dict(next(iter(r.metric_records.values()))) for r in records]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Flower aggregates a round's replies, then calls this; with none, it would go on with the old weights.
        if server_round > 0 and not replies:
            raise RuntimeError(
                f"round {server_round}: no sampled client returned weights (their errors are in the log above)."
            )
        load_trainable(model, arrays.to_torch_state_dict())
        batches = eval_batches(sources["eval"], 0, 1, cfg.train.micro_batch_size)
        metrics = metrics_over(model, tasks.get(cfg.model.task), processor, cfg, batches)
        clients = sorted(replies, key=lambda c: c["client"])
        replies.clear()
        rounds.append({"round": server_round, "eval": _scalars(metrics), "clients": clients})
        client_text = ", ".join(f"{int(c['client'])}: {c['train_loss']:.4f}" for c in clients)
        log.info(
            "round %d/%d: global %s %.4f, eval loss %.4f%s (%.0f s)", server_round, f.rounds, headline,
            metrics[headline], metrics["loss"], f" | client loss {client_text}" if clients else "",
            time.time() - started,
        )  # fmt: skip
        return MetricRecord(_scalars(metrics))

    server = ServerApp()
    final: dict[str, Any] = {}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(f.seed)  # Flower samples the round's clients with `random`
        try:
            result = make_strategy(cfg, on_train_replies).start(
                grid=grid,
                initial_arrays=ArrayRecord(trainable_state(model)),
                num_rounds=f.rounds,
                train_config=ConfigRecord(),
                evaluate_fn=evaluate_fn,
            )
            final["state"] = result.arrays.to_torch_state_dict()
        except BaseException as exc:  # re-raised below: Flower's server thread would only log it
            server_error.append(exc)

    _ensure_ray(cfg)
    use_gpu = resolve_use_gpu(cfg)
    resources = {"num_cpus": cfg.scaling.cpus_per_worker, "num_gpus": cfg.scaling.gpus_per_worker if use_gpu else 0.0}
    # Flower's Ray backend shuts Ray down when the simulation ends.
    run_simulation(server_app=server, client_app=make_client_app(cfg, client_uris), num_supernodes=f.num_clients,
                   backend_config={"client_resources": resources})  # fmt: skip
    if server_error:
        raise server_error[0]
    if "state" not in final:
        raise RuntimeError("the Flower simulation ended without a final global model; see the log above.")
    checkpoint_uri, final_eval = save_final_checkpoint(cfg, final["state"], sources["train"], sources["eval"], run_uri)
    results = {
        "strategy": f.strategy,
        "dp": f.dp,
        "rounds": rounds,
        "clients": info,
        "final_eval": final_eval,
        "checkpoint": checkpoint_uri,
        "run_dir": run_uri,
        "time_s": time.time() - started,
        "config": dataclasses.asdict(f),
    }
    write_run_file(cfg, RESULTS_FILE, json.dumps(results, indent=2, default=str))
    write_run_file(cfg, "metrics.json", json.dumps({"eval": final_eval, "train/time_s": results["time_s"]},
                                                   indent=2, default=str))  # fmt: skip
    return results
