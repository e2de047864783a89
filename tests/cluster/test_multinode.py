"""Corral on several Ray nodes, on one machine: `ray.cluster_utils.Cluster` gives a head
and two worker nodes, each a raylet with its own resources (one CPU each; the workers
two simulated GPUs each) and its own dashboard agent, with token authentication on.

- A fine-tuning job, submitted through Corral's launcher (the Ray Jobs API, `python -m
  jobs.launch`), trains on two nodes and writes its checkpoint under the storage URI
  (a directory every node sees).
- A worker node removed after the first checkpoint row: Ray Train restarts the worker
  group on what is left, which resumes from that row, and the job completes.
- An LLM app's two replicas run on two nodes.
- A tensor-parallel vLLM replica's GPU bundles (STRICT_PACK) land on one node, and a
  replica with more GPUs than one node has is left unplaced rather than split.

One cluster serves the module, started by tests/cluster/cluster_host.py in a process of
its own; Ray drivers run in processes of their own too (tests/cluster/drivers.py): the
pytest process may hold the session's Ray (tests/conftest.py). The node removal ends the
module, as it leaves the cluster smaller.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig
from corral.job_tokens import JobTokens
from corral.services.fine_tuning import job_output
from corral.storage import Storage
from corral.store import migrate
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.config import SFTJobConfig
from serve_apps.model_cache import local_path
from tests.job_api import job_api

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_ray]

REPO_ROOT = Path(__file__).resolve().parents[2]
TENANT = "multinode"
WORKERS = 2
START_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 420.0
STEP = re.compile(r"step (\d+) loss ")
RESUMED = re.compile(r"resumed at step (\d+) from (\S+)")
ANSWER = "Corral fine-tunes Llama models on Ray."
# One CPU per node: a Train worker takes a whole node, so the two workers of a job run
# on two nodes and the three nodes leave room for both after one is removed.
CLUSTER = {
    "head": {"num_cpus": 1, "resources": {"node_head": 1}},
    "workers": {
        "a": {"num_cpus": 1, "num_gpus": 2, "resources": {"node_a": 1}},
        "b": {"num_cpus": 1, "num_gpus": 2, "resources": {"node_b": 1}},
    },
    # A node whose raylet dies is declared dead after 3 missed health checks, 1 s apart
    # (Ray's default: 5, 3 s apart). A live raylet still has 10 s to answer each one.
    "system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _read_line(stream: IO[str], timeout_s: float) -> str:
    """One line from `stream` within `timeout_s` ('' at its end)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not lines:
        raise TimeoutError(f"no answer within {timeout_s:.0f} s")
    return lines[0]


@dataclass
class MultiNodeCluster:
    """The running cluster: its nodes by name (their Ray node ids), how to reach it and
    how to take a node away."""

    process: subprocess.Popen[str]
    nodes: dict[str, str]
    dashboard_url: str
    env: dict[str, str]
    token: str
    log_path: Path

    def remove(self, name: str, *, graceful: bool = False) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"remove": name, "graceful": graceful}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(_read_line(self.process.stdout, 60) or "{}")
        assert answer == {"removed": name}, answer

    def driver(self, name: str, timeout_s: float = 240, **args: Any) -> Any:
        """Run drivers.NAME(args) on the cluster, in a process of its own; its result."""
        done = subprocess.run(
            [sys.executable, "-m", "tests.cluster.drivers", name, json.dumps(args)],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert done.returncode == 0, f"driver {name}:\n{done.stdout[-3000:]}{done.stderr[-6000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def api(self, path: str, **params: Any) -> Any:
        """A GET on the head's dashboard (Jobs and state APIs), with the cluster's token."""
        response = httpx.get(
            f"{self.dashboard_url}{path}",
            params=params,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        return response.json()

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """Every actor of that class the cluster has had, alive or dead, with its node."""
        body = self.api(
            "/api/v0/actors",
            limit=10_000,
            detail="true",
            filter_keys=["class_name"],
            filter_predicates=["="],
            filter_values=[class_name],
        )
        actors: list[dict[str, Any]] = body["data"]["result"]["result"]
        return actors

    def train_workers(self, submission_id: str) -> list[dict[str, Any]]:
        """The Ray Train worker actors of one Ray job (a submission of Corral's)."""
        job_id = self.api(f"/api/jobs/{submission_id}")["job_id"]
        return [a for a in self.actors("RayTrainWorker") if a["job_id"] == job_id]


def _cluster_env(temp_dir: Path, gcs_port: int, token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        # Every Ray process of the cluster inherits these (cluster_host.py says why).
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT / "platform"), str(REPO_ROOT), env.get("PYTHONPATH", "")]
        ),
        # tempfile's default (and Ray's address file beside it) stays inside the test's dir.
        "TMPDIR": str(temp_dir),
    }
    return env


@pytest.fixture(scope="module")
def cluster() -> Iterator[MultiNodeCluster]:
    # Short: Ray's socket paths live under it.
    temp_dir = Path(tempfile.mkdtemp(prefix="corral-mn-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token = secrets.token_hex(32)
    token_path.write_text(token)
    token_path.chmod(0o600)
    gcs_port, dashboard_port = _free_ports(2)
    config_path = temp_dir / "cluster.json"
    config_path.write_text(
        json.dumps(
            CLUSTER
            | {
                "temp_dir": str(temp_dir / "ray"),
                "gcs_port": gcs_port,
                "dashboard_port": dashboard_port,
            }
        )
    )
    env = _cluster_env(temp_dir, gcs_port, token_path)
    log_path = temp_dir / "cluster_host.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster.cluster_host", str(config_path)],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # its group holds the whole cluster: see the teardown
        )
    try:
        assert process.stdout is not None
        line = _read_line(process.stdout, START_TIMEOUT_S)
        assert line, f"the cluster did not start:\n{log_path.read_text()[-4000:]}"
        ready = json.loads(line)
        yield MultiNodeCluster(
            process=process,
            nodes=ready["nodes"],
            dashboard_url=ready["dashboard_url"],
            env=env,
            token=token,
            log_path=log_path,
        )
    finally:
        if process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(json.dumps({"stop": True}) + "\n")
                process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=90)
        if process.stdout is not None:
            process.stdout.close()
        # Whatever the shutdown left (a worker process that outlived its raylet), by the
        # group this test started.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------- placement


def test_a_tensor_parallel_replica_keeps_its_gpus_on_one_node(cluster: MultiNodeCluster) -> None:
    gpu_nodes = {cluster.nodes["a"], cluster.nodes["b"]}
    # A group that fits is placed in well under a second; one that does not never is.
    result = cluster.driver(
        "tensor_parallel_placement",
        gpus_per_replica=[2, 4],
        cpus_per_replica=0.25,
        wait_s={"2": 60, "4": 5},
    )

    two = result["2"]
    assert two["strategy"] == "STRICT_PACK"
    assert two["bundles"] == [{"CPU": 0.25, "GPU": 1.0}, {"GPU": 1.0}]
    assert two["replica_num_gpus"] == 0  # its GPUs are the vLLM workers', in the bundles
    assert two["placed"], two
    [node] = set(two["bundle_nodes"])
    assert node in gpu_nodes
    # A worker in the second bundle runs on that node, with one of its GPUs.
    assert two["worker"]["node_id"] == node
    assert len(two["worker"]["gpu_ids"]) == 1

    # Four GPUs are two nodes' worth: never split, the replica waits for a node that has
    # them all. Packed loosely, the same bundles would have spread over both nodes.
    four = result["4"]
    assert four["strategy"] == "STRICT_PACK"
    assert len(four["bundles"]) == 4
    assert not four["placed"] and four["state"] == "PENDING", four
    assert four["pack_placed"], four
    assert set(four["pack_bundle_nodes"]) == gpu_nodes


def test_an_llm_app_s_replicas_run_on_different_nodes(
    cluster: MultiNodeCluster, demo_model_dir: Path
) -> None:
    from corral.api.common import Message
    from corral.llama3 import format_chat

    prompt = format_chat([Message(role="user", content="hi", tool_calls=[], tool_responses=[])])
    result = cluster.driver(
        "llm_replicas",
        model_dir=str(demo_model_dir),
        replicas=2,
        cpus_per_replica=0.25,
        deploy_timeout_s=180,
        prompt=prompt,
    )
    # Serve spreads an app's replicas over nodes by default (its SPREAD scheduling).
    replica_nodes = result["replica_nodes"]
    assert len(replica_nodes) == 2
    assert len(set(replica_nodes)) == 2, replica_nodes
    assert set(replica_nodes) <= set(cluster.nodes.values())
    # Both answer the same (greedy) text from the demo model.
    assert len(set(result["texts"])) == 1 and result["texts"][0], result["texts"]


# ---------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class Training:
    database: Database
    storage: Storage
    model_dir: Path
    # Where jobs report (the internal routes of an API over `database`) and the secret
    # their tokens are made under.
    internal_url: str
    token_secret: str


@pytest.fixture(scope="module")
def training(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Training]:
    """The store jobs report to, through an API's internal routes on loopback (every node
    of this cluster reaches it), and the storage URI they write under (a directory every
    node sees)."""
    root = tmp_path_factory.mktemp("multinode-training")
    url = f"sqlite:///{root / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    secret = secrets.token_urlsafe(32)
    try:
        with job_api(database, root / "home", tokens=JobTokens(secret.encode())) as api:
            yield Training(
                database, Storage(str(root / "storage")), demo_model_dir, api.url, secret
            )
    finally:
        database.dispose()


def _rows(count: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "dialog": [
                {"role": "system", "content": f"{prefix} assistant number {index}."},
                {"role": "user", "content": "What is Corral?"},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for index in range(count)
    ]


def _store_job(training: Training, uuid: str, *, epochs: int, steps_per_epoch: int) -> str:
    """A scheduled LoRA job as the API stores it (launch config included); its key."""
    key = job_key(TENANT, uuid)
    config = SFTJobConfig(
        job_key=key,
        model_dir=training.model_dir,
        **job_output(training.storage, TENANT, uuid),
        rows=_rows(WORKERS * steps_per_epoch, "You are"),
        validation_rows=_rows(2, "You are a new"),
        algorithm="lora",
        adapter=LoraFinetuningConfig(
            lora_attn_modules=["q_proj", "v_proj"],
            apply_lora_to_mlp=False,
            apply_lora_to_output=False,
            rank=4,
            alpha=16,
        ),
        optimizer=OptimizerConfig(optimizer_type="adamw", lr=3e-3, lr_min=3e-4, weight_decay=0),
        n_epochs=epochs,
        n_iters=steps_per_epoch,
        batch_size=1,
        shuffle=False,
        num_workers=WORKERS,
        max_failures=2,
    )
    with training.database.transaction() as session:
        JobStore(session).create(
            job_uuid=uuid,
            tenant=TENANT,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            request={"job_uuid": uuid},
            launch=config.model_dump(mode="json"),
        )
    return key


@dataclass(frozen=True)
class Finished:
    status: JobStatus | None
    lines: list[str]
    checkpoints: list[tuple[int, str]]
    resources: dict[str, Any] | None
    attempt: int


def _state(training: Training, key: str) -> Finished:
    with training.database.transaction() as session:
        store = JobStore(session)
        job = store.by_key(key)
        return Finished(
            status=store.status_of(key),
            lines=[line.line for line in store.log_lines(key)],
            checkpoints=[(c.iters, c.path) for c in store.checkpoints(key)],
            resources=job.resources_allocated,
            attempt=job.attempt,
        )


def _wait_until_finished(training: Training, key: str, cluster: MultiNodeCluster) -> Finished:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        state = _state(training, key)
        if state.status is not None and state.status.is_terminal:
            return state
        if time.monotonic() > deadline:
            ray_job = cluster.api(f"/api/jobs/{key}")
            pytest.fail(f"job {key} still {state.status}: {ray_job}\n" + "\n".join(state.lines))
        time.sleep(0.5)


def _submit(cluster: MultiNodeCluster, training: Training, key: str) -> None:
    submitted = cluster.driver(
        "submit_job",
        jobs_url=cluster.dashboard_url,
        internal_url=training.internal_url,
        token_secret=training.token_secret,
        job_key=key,
        timeout_s=120,
    )
    assert submitted == {"submitted": True}


def test_a_fine_tuning_job_trains_on_two_nodes(
    cluster: MultiNodeCluster, training: Training
) -> None:
    key = _store_job(training, "spread", epochs=1, steps_per_epoch=2)
    _submit(cluster, training, key)
    finished = _wait_until_finished(training, key, cluster)
    assert finished.status is JobStatus.COMPLETED, "\n".join(finished.lines)

    workers = cluster.train_workers(key)
    assert len(workers) == WORKERS, workers
    nodes = {worker["node_id"] for worker in workers}
    assert len(nodes) == WORKERS and nodes <= set(cluster.nodes.values()), workers
    assert finished.resources == {"num_workers": WORKERS, "use_gpu": False}

    # The checkpoint is under the storage URI, in the job's own directory, complete.
    [(iters, path)] = finished.checkpoints
    assert iters == 2
    job_uri = training.storage.job_uri(TENANT, "spread")
    assert Path(path) == local_path(job_uri) / "checkpoints" / "iter-2", (path, job_uri)
    assert training.storage.is_file(f"{job_uri}/checkpoints/iter-2/adapter_model.safetensors")
    assert finished.lines[-1] == "done after 2 steps", finished.lines


def test_a_job_resumes_from_its_checkpoint_when_a_node_is_removed(
    cluster: MultiNodeCluster, training: Training
) -> None:
    """Three epochs of 16 steps, a checkpoint after each. Once the first checkpoint row
    is stored, a worker node holding a Train worker is removed (its processes killed, as
    a lost machine's are). Ray Train restarts the worker group on the two nodes left,
    whose rank 0 resumes from the job's last checkpoint row; the job completes.

    A step of the tiny model takes about 0.1 s, so the node to remove is chosen while the
    first epoch trains and removed as soon as its checkpoint row is seen: the 32 steps
    left leave ample time for the removal to land mid-job."""
    steps, epochs = 16, 3
    key = _store_job(training, "node-lost", epochs=epochs, steps_per_epoch=steps)
    _submit(cluster, training, key)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(STEP.match(line) for line in _state(training, key).lines):
        assert time.monotonic() < deadline, "no training step in time"
        time.sleep(0.2)
    alive = [w for w in cluster.train_workers(key) if w["state"] == "ALIVE"]
    assert len(alive) == WORKERS, alive
    name_of = {node_id: name for name, node_id in cluster.nodes.items()}
    on_workers = sorted(name_of[w["node_id"]] for w in alive if name_of[w["node_id"]] != "head")
    assert on_workers, alive  # two workers on three nodes: one at least on a worker node
    lost = on_workers[0]
    while not (removed_at := _state(training, key)).checkpoints:
        assert time.monotonic() < deadline, "no checkpoint row in time"
        time.sleep(0.05)
    assert removed_at.status is JobStatus.RUNNING, removed_at
    cluster.remove(lost)
    removed_wall = datetime.now(UTC)

    finished = _wait_until_finished(training, key, cluster)
    assert finished.status is JobStatus.COMPLETED, "\n".join(finished.lines)
    lines = finished.lines

    # The worker group restarted once, within the same attempt (Ray Train's FailureConfig,
    # not a relaunch by Corral), on the nodes that are left.
    assert finished.attempt == 0
    workers = cluster.train_workers(key)
    assert len(workers) == 2 * WORKERS, workers
    first_group = {w["actor_id"] for w in alive}
    second_group = [w for w in workers if w["actor_id"] not in first_group]
    assert len(second_group) == WORKERS, workers
    assert cluster.nodes[lost] not in {w["node_id"] for w in second_group}, second_group

    # Rank 0 of the new group resumed from a stored checkpoint row, and the steps after it
    # ran on to the last.
    [resumed] = [m for line in lines if (m := RESUMED.search(line))]
    resumed_step, resumed_from = int(resumed.group(1)), resumed.group(2)
    assert (resumed_step, resumed_from) in finished.checkpoints, (resumed.group(0), finished)
    assert resumed_step % steps == 0 and resumed_step >= steps
    resumed_line = next(i for i, line in enumerate(lines) if RESUMED.search(line))
    after = [int(m.group(1)) for line in lines[resumed_line:] if (m := STEP.match(line))]
    assert after == list(range(resumed_step + 1, epochs * steps + 1)), lines
    assert [iters for iters, _ in finished.checkpoints] == [
        steps * epoch for epoch in range(1, epochs + 1)
    ]
    assert lines[-1] == f"done after {epochs * steps} steps", lines
    # The per-step metrics say the same: the step after the checkpoint was measured again
    # after the removal (a step run again overwrites its row), and every step up to the
    # last has its figures.
    with training.database.transaction() as session:
        rows = {row.step: row for row in JobStore(session).metrics(key)}
    assert sorted(rows) == list(range(epochs * steps + 1)), sorted(rows)
    assert {"loss", "validation_loss"} <= set(rows[epochs * steps].values)
    redone = rows[resumed_step + 1].recorded_at
    assert redone.replace(tzinfo=None) > removed_wall.replace(tzinfo=None), (redone, removed_wall)
