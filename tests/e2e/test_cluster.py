"""The cluster path as users run it, on one machine: `ray start` a head and a second node with token
authentication, `ray job submit` ray_jobs/train.py, export.py and tune.py, data and runs on S3 (moto
on loopback), the second node stopped mid-run, and a canary secret key that must show up nowhere Ray
or fmdist keeps what it was given: job output, the Jobs API, runtime envs, logs, S3.

Every Ray process runs in a subprocess with the environment a node of a real cluster would have
(credentials from the node's own chain, here its environment), so this pytest process and any
in-process Ray of other tests are left alone. The cluster's processes are found by an environment
marker and killed by pid: `ray stop` would stop every Ray on the machine.

World size: 2 Ray Train workers (train), 1 per trial (tune).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
import requests
import yaml

from tests.conftest import TINY_MODEL, sentiment_rows, write_shards

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
MARKER = "FMDIST_CLUSTER_TEST_NODE"  # in every process of the test's cluster: how they are found and killed
CONFIG = "configs/sst2-minilm.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def marked(prefix: str) -> list[psutil.Process]:
    """Processes whose marker starts with `prefix` (one node, or the whole cluster)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER, "").startswith(prefix):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_marked(prefix: str) -> int:
    """SIGKILL every marked process until none is left (a raylet may start workers meanwhile)."""
    killed = 0
    for _ in range(10):
        procs = marked(prefix)
        if not procs:
            return killed
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
    raise RuntimeError(f"processes marked {prefix} survived SIGKILL: {marked(prefix)}")


def run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def ray_start(env: dict[str, str], *args: str) -> None:
    proc = run([RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args], env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def submit_cmd(dashboard: str, submission_id: str, *entrypoint: str) -> list[str]:
    """The README's `ray job submit` line (plus a submission id to look the job up by)."""
    return [RAY, "job", "submit", "--address", dashboard, "--submission-id", submission_id, "--working-dir", ".",
            "--", "python", *entrypoint]  # fmt: skip


def api(dashboard: str, token: str, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{dashboard}{path}", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def state(dashboard: str, token: str, resource: str) -> list[dict]:
    """Every record of one state-API resource (actors, tasks, ...), with detail (runtime envs included)."""
    reply = api(dashboard, token, f"/api/v0/{resource}", detail="true", limit=10000)
    reply.raise_for_status()
    return reply.json()["data"]["result"]["result"]


def alive_nodes(dashboard: str, token: str) -> dict[str, str]:
    """{node name (its custom resource): node id} of the alive nodes."""
    names = {}
    for node in state(dashboard, token, "nodes"):
        named = [r for r in node["resources_total"] if r in ("head", "node2", "node3")]
        if node["state"] == "ALIVE" and named:
            names[named[0]] = node["node_id"]
    return names


def s3_keys(bucket: str, prefix: str = "") -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def s3_read(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def holding(where: str, data: bytes, needle: bytes) -> list[tuple[str, bytes]]:
    """(where, line) for every line of `data` that holds `needle`."""
    return [(where, line) for line in data.splitlines() if needle in line]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


@pytest.fixture
def cluster(s3_endpoint):
    """A head (1 logical CPU) and a second node (1 CPU) on loopback with token auth; killed by pid after."""
    base = Path(tempfile.mkdtemp(prefix="fmdist-cluster-test-", dir="/tmp"))
    try:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "FMDIST_"))}
        # The README's way to make a token: `ray get-auth-token --generate` saves it to ~/.ray/auth_token (a
        # home of the test's own here, so the machine's ~/.ray is left alone).
        home = base / "home"
        made = run([RAY, "get-auth-token", "--generate"], clean | {"HOME": str(home)}, timeout=60)
        assert made.returncode == 0, made.stderr
        token = (home / ".ray" / "auth_token").read_text()
        assert made.stdout == token
        canary = f"fmdist-canary-{uuid.uuid4().hex}"
        dashboard_port, gcs_port = free_port(), free_port()
        # The entrypoint's `python` is the cluster's Python. A wrapper, not .venv/bin on PATH: with that, torch
        # would find pip's ninja instead of the system's and rebuild DeepSpeed's JIT op (~50 s) for every worker.
        (base / "bin").mkdir()
        (base / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (base / "bin" / "python").chmod(0o755)
        common = {
            **clean,
            "PATH": f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            # The store and the canary secret: what an instance role would provide on a real cluster.
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": canary,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        # Nodes read the token from a file named by RAY_AUTH_TOKEN_PATH; a dead node is noticed in ~3 s
        # instead of ~15 s (the GCS's health checks of raylets).
        node = common | {"RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token")}
        head = node | {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}

        def start_node(name: str, num_cpus: int) -> None:
            """A worker node with its own temp dir (Ray allows one per node) and its own agent port."""
            ray_start(node | {MARKER: f"{base}/{name}"}, f"--address=127.0.0.1:{gcs_port}", f"--num-cpus={num_cpus}",
                      f"--resources={json.dumps({name: 1})}", f"--temp-dir={base / name}",
                      f"--dashboard-agent-listen-port={free_port()}")  # fmt: skip

        ray_start(
            head | {MARKER: f"{base}/head"},
            "--head",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=1",  # so that 2 workers of 1 CPU must spread over both nodes
            f"--resources={json.dumps({'head': 1})}",
            f"--temp-dir={base / 'head'}",
        )
        start_node("node2", num_cpus=1)
        yield {
            "base": base,
            "token": token,
            "canary": canary,
            "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "dashboard_port": dashboard_port,
            # The client: the token at its default path (~/.ray/auth_token), and the canary key too.
            "client_env": common | {"HOME": str(home), MARKER: f"{base}/client"},
            "start_node": start_node,
        }
    finally:
        kill_marked(f"{base}/")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_cluster_job_submit_survives_a_node_stop_and_leaks_no_secret(cluster, s3_bucket, tmp_path):
    dashboard, token, canary, env = cluster["dashboard"], cluster["token"], cluster["canary"], cluster["client_env"]
    t0 = time.monotonic()

    # The dashboard (Jobs API) listens on loopback only, and refuses a client without the token.
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == cluster["dashboard_port"]}  # fmt: skip
    assert listening == {"127.0.0.1"}, listening
    assert requests.get(f"{dashboard}/api/jobs/", timeout=30).status_code == 401
    no_mode = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = run([RAY, "job", "submit", "--address", dashboard, "--", "echo", "hi"], no_mode, timeout=60)
    assert refused.returncode != 0
    assert "AuthenticationError" in refused.stderr + refused.stdout
    assert "Missing authentication token" in refused.stderr + refused.stdout
    nodes = wait_for("two alive nodes", lambda: len(n := alive_nodes(dashboard, token)) == 2 and n, timeout_s=30)

    # Data on S3: 10 shards of 64 rows for training, 64 rows for evaluation.
    for split, n, seed in (("train", 640, 1), ("eval", 64, 2)):
        local = write_shards(tmp_path / split, sentiment_rows(n, seed=seed), rows_per_shard=64)
        for path in sorted(local.iterdir()):
            boto3.client("s3").upload_file(str(path), s3_bucket, f"data/{split}/{path.name}")
    tiny = [
        f"model.from_config={yaml.safe_dump(TINY_MODEL['from_config'], default_flow_style=True).strip()}",
        f"data.train=s3://{s3_bucket}/data/train",
        f"data.eval=s3://{s3_bucket}/data/eval",
        "data.max_length=32",
        "train.micro_batch_size=8",
        "train.lr=5e-3",
        "train.log_every_steps=5",
        f"run.storage_path=s3://{s3_bucket}/runs",
    ]
    max_steps = 40  # one epoch
    train_cmd = submit_cmd(dashboard, "fmdist-train", "ray_jobs/train.py", CONFIG, *tiny,
                           f"train.max_steps={max_steps}", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                           "run.name=cluster", "run.checkpoint_every_steps=5", "run.max_failures=2")  # fmt: skip
    job = subprocess.Popen(train_cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Once Ray Train has recorded a checkpoint, stop the second node: all its processes, at once.
        wait_for(
            "a recorded checkpoint",
            lambda: "runs/cluster/checkpoint_manager_snapshot.json" in s3_keys(s3_bucket, "runs/cluster/"),
            timeout_s=180,
        )
        t_stop = time.monotonic()
        assert kill_marked(f"{cluster['base']}/node2") > 0
        cluster["start_node"]("node3", num_cpus=4)  # the replacement; 5 CPUs also fit two tune trials at once
        train_out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    t_train = time.monotonic()
    assert job.returncode == 0, train_out[-6000:]
    assert "=== fmdist run summary ===" in train_out

    # (c) the run resumed from a checkpoint taken before the stop and finished; (b) checkpoints on S3,
    # each with every rank's manifest.
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token}"})
    assert jobs.get_job_status("fmdist-train") == JobStatus.SUCCEEDED
    metrics = json.loads(s3_read(s3_bucket, "runs/cluster/metrics.json"))
    assert metrics["step"] == max_steps
    assert "restore/step" in metrics, f"the run did not resume from a checkpoint: {metrics}"
    assert 5 <= metrics["restore/step"] < max_steps and metrics["restore/step"] % 5 == 0, metrics
    final = f"runs/cluster/checkpoint_step_{max_steps:08d}/"
    listed = s3_keys(s3_bucket, final)
    assert {final + "manifest_rank0.json", final + "manifest_rank1.json"} <= set(listed), listed

    # (a) the job's Ray Train workers ran on both nodes, then (after the stop) on the replacement.
    train_job_id = jobs.get_job_info("fmdist-train").job_id
    worker_nodes = {a["node_id"] for a in state(dashboard, token, "actors")
                    if a["class_name"] == "RayTrainWorker" and a["job_id"] == train_job_id}  # fmt: skip
    assert {nodes["head"], nodes["node2"]} <= worker_nodes, (nodes, worker_nodes)
    assert alive_nodes(dashboard, token).get("node3") in worker_nodes, worker_nodes

    # Export from the S3 run directory through the cluster; the export loads with transformers and predicts.
    model_dir = tmp_path / "model"
    export_out = run(submit_cmd(dashboard, "fmdist-export", "ray_jobs/export.py", f"s3://{s3_bucket}/runs/cluster",
                                str(model_dir)), env, timeout=180)  # fmt: skip
    assert export_out.returncode == 0, export_out.stdout[-4000:] + export_out.stderr[-4000:]
    t_export = time.monotonic()
    import transformers

    classify = transformers.pipeline("text-classification", model=str(model_dir))
    eval_rows = sentiment_rows(64, seed=2)
    predicted = [p["label"] for p in classify(eval_rows["sentence"])]
    pairs = list(zip(eval_rows["label"], predicted, strict=True))
    confusion = [[pairs.count((i, name)) for name in ("negative", "positive")] for i in range(2)]
    assert confusion == metrics["eval"]["confusion_matrix"]  # the run's own final evaluation

    # A tiny search the same way: two trials of one worker, at once.
    tune_out = run(submit_cmd(dashboard, "fmdist-tune", "ray_jobs/tune.py", CONFIG, *tiny, "train.max_steps=4",
                              "scaling.num_workers=1", "run.name=search", "tune.num_samples=1",
                              "tune.search_space={train.lr: {grid: [0.005, 0.001]}}"), env, timeout=300)  # fmt: skip
    assert tune_out.returncode == 0, tune_out.stdout[-4000:] + tune_out.stderr[-4000:]
    assert jobs.get_job_status("fmdist-tune") == JobStatus.SUCCEEDED
    board = json.loads(s3_read(s3_bucket, "runs/search/leaderboard.json"))
    assert [row["status"] for row in board] == ["DONE", "DONE"], board
    t_tune = time.monotonic()

    # The canary secret (and the cluster's token): in no job output, no Jobs API answer, no runtime env
    # of an actor or task, no file under the nodes' temp dirs (logs, runtime envs), no stored object.
    found: list[tuple[str, bytes]] = []
    outputs = {
        "refused submit": refused.stdout + refused.stderr,
        "train submit": train_out,
        "export submit": export_out.stdout + export_out.stderr,
        "tune submit": tune_out.stdout + tune_out.stderr,
    }
    infos = [jobs.get_job_info(sid) for sid in ("fmdist-train", "fmdist-export", "fmdist-tune")]
    jobs_api = json.dumps([j.dict() for j in jobs.list_jobs()] + [j.dict() for j in infos], default=str)
    assert "working_dir" in jobs_api  # the jobs' runtime envs are in what is searched
    records = {resource: state(dashboard, token, resource) for resource in ("actors", "tasks", "jobs", "workers")}
    assert "AWS_ENDPOINT_URL" in json.dumps(records["actors"])  # so are the workers' runtime envs (env_vars)
    files = [p for p in cluster["base"].rglob("*") if p.is_file() and p.name != "auth_token"]
    assert any(p.name.startswith("worker-") for p in (cluster["base"] / "node2").rglob("*"))  # node2's logs too
    files += [p for p in model_dir.rglob("*") if p.is_file()]
    stored = s3_keys(s3_bucket)
    assert any(k.endswith(".pt") for k in stored)
    for needle in (canary.encode(), token.encode()):
        for where, text in outputs.items():
            found += holding(where, text.encode(), needle)
        found += holding("Jobs API", jobs_api.encode(), needle)
        for resource, listed_records in records.items():
            for record in listed_records:
                found += holding(f"state API {resource}", json.dumps(record).encode(), needle)
        for path in files:
            found += holding(str(path), path.read_bytes(), needle)
        for key in stored:
            found += holding(f"s3://{s3_bucket}/{key}", s3_read(s3_bucket, key), needle)
    unexpected = [f"{where}: {line[:400]!r}" for where, line in found]
    assert not unexpected, "\n".join(unexpected)
    print(
        f"\ncluster e2e: train {t_train - t0:.0f} s (node stopped at {t_stop - t0:.0f} s), export "
        f"{t_export - t_train:.0f} s, tune {t_tune - t_export:.0f} s, leak scan {time.monotonic() - t_tune:.0f} s "
        f"({len(files)} files, {len(stored)} objects)"
    )

    # The search's best model is in its s3:// run directory (it used to land in a local directory named
    # "s3:/<bucket>/..." in the job's working directory, lost with it).
    assert "runs/search/best-model/model.safetensors" in s3_keys(s3_bucket, "runs/search/")
