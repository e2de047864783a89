"""Chaos: the API server process is SIGKILLed while a streamed chat completion, several
dataset creations and a job submission are in flight, and a tight loop of dataset
creations is writing. Every client sees its request end (an error or EOF) within a
bounded time after the kill, never a hang; after a restart every write that was
acknowledged is there exactly once and nothing is half written (a dataset row only with
its full row count, a job row only with its launch config), checked through the API and
in the SQL store itself, on SQLite and PostgreSQL.

In flight deterministically: the stream has delivered its first chunk of a reply far
longer than the test; the held dataset creations and the held job submission have made
the API server fetch a dataset from the test's own HTTP server, which has started the
response and holds the rest back (the test knows the fetch arrived). The writing loop is
killed at whatever moment the kill comes, so acknowledged-or-not is decided by the race
itself, and the invariant must hold for every outcome.

The API server runs as its own process (tests/api/chaos_server.py, built as `corral
serve` builds it) on the session's Ray cluster and Serve; the replica side of a dying
stream is tested in tests/serve_apps.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve
from ray.job_submission import JobSubmissionClient
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from corral.config import Settings
from corral.job_tokens import JobTokens
from corral.ray_jobs import RayJobLauncher
from corral.store.db import Database
from corral.store.tables import Dataset, Job
from corral.tenancy import job_key
from tests.api.conftest import ALPHA, API_KEYS
from tests.api.live_server import bound_socket
from tests.api.training_requests import lora_sft_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TENANT = "alpha"  # the tenant of the ALPHA key
# A reply of 400 words at 0.1 s a word: the stream outlasts the test's kill by far.
REPLY = " ".join(f"word{index}" for index in range(400))
SECONDS_PER_STEP = 0.1
READ_TIMEOUT_S = 30.0  # every client here gives up reading after this long...
CLEAN_END_S = 10.0  # ...but each in-flight request must end well before, after the kill
START_TIMEOUT_S = 180.0
ACKED_JOB = "chaos-acked"
HELD_JOB = "chaos-held"
HELD_DATASETS = [f"held-{index}" for index in range(3)]
LOOP_WRITERS = 2
ACKS_BEFORE_KILL = 6


def ray_submission_id(tenant: str, job_uuid: str) -> str:
    """The Ray submission id the launcher gives a job: its key."""
    return job_key(tenant, job_uuid)


# ---------------------------------------------------------------------- request bodies


def _dialog(index: int) -> dict[str, Any]:
    return {
        "dialog": [
            {"role": "user", "content": f"question {index}"},
            {"role": "assistant", "content": f"answer {index}"},
        ]
    }


def data_url(row_count: int) -> str:
    text_ = "".join(json.dumps(_dialog(index)) + "\n" for index in range(row_count))
    return "data:application/jsonl;base64," + base64.b64encode(text_.encode()).decode()


def dataset(url: str) -> dict[str, Any]:
    return {"columns": {"dialog": "dialog"}, "content_url": url, "metadata": {}}


def sft_request(job_uuid: str, train_url: str) -> dict[str, Any]:
    return lora_sft_request(job_uuid, dataset(train_url), dataset(data_url(2)))


def chat() -> dict[str, Any]:
    return {
        "model": "llama3_8b_chat",
        "dialog": {
            "message": {"role": "user", "content": "Talk.", "tool_calls": [], "tool_responses": []},
            "message_history": [],
        },
        "sampling_params": {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0},
        "available_tools": [],
        "max_tokens": 0,
        "stream": True,
        "logprobs": False,
    }


# ---------------------------------------------------------------------- the test's servers


class HoldingDatasetServer:
    """A loopback HTTP server that starts every response (headers and a first line of
    JSON Lines) and holds the rest back until released: a fetch the test knows is in
    flight on the API server."""

    def __init__(self) -> None:
        self._arrived: set[str] = set()
        self._changed = threading.Condition()
        self._release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/jsonl")
                self.send_header("Content-Length", str(10_000_000))
                self.end_headers()
                try:
                    self.wfile.write((json.dumps(_dialog(0)) + "\n").encode())
                    self.wfile.flush()
                except OSError:
                    return
                with outer._changed:
                    outer._arrived.add(self.path)
                    outer._changed.notify_all()
                outer._release.wait(timeout=120)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}.jsonl"

    def wait_for(self, names: list[str], timeout_s: float) -> None:
        wanted = {f"/{name}.jsonl" for name in names}
        with self._changed:
            arrived = self._changed.wait_for(lambda: wanted <= self._arrived, timeout_s)
        assert arrived, f"the API server fetched only {sorted(self._arrived)} of {sorted(wanted)}"

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


@dataclass
class ApiProcess:
    process: subprocess.Popen[bytes]
    base_url: str

    def kill(self) -> float:
        """SIGKILL the server (its whole process group): no shutdown of any kind."""
        os.killpg(self.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.process.wait(timeout=30)
        return killed_at


def start_api(config: dict[str, Any], log_path: Path) -> ApiProcess:
    """Start tests/api/chaos_server.py on a fresh listening socket and wait until it
    answers. The parent closes its copy of the socket, so once the child dies nothing
    listens there: a late connection is refused at once rather than left waiting."""
    sock = bound_socket()
    sock.listen(128)
    port = sock.getsockname()[1]
    config_path = log_path.with_suffix(".json")
    config_path.write_text(json.dumps(config | {"fd": sock.fileno()}))
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.api.chaos_server", str(config_path)],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=[sock.fileno()],
            start_new_session=True,
        )
    sock.close()
    api = ApiProcess(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"the API server exited with {process.returncode}: {_tail(log_path)}")
        try:
            if httpx.get(f"{api.base_url}/health", timeout=5).status_code == 200:
                return api
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            api.kill()
            pytest.fail(f"the API server did not answer in {START_TIMEOUT_S} s: {_tail(log_path)}")
        time.sleep(0.25)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


# ---------------------------------------------------------------------- clients in flight


@dataclass
class Outcome:
    """How one request ended: its HTTP status if one came, and how reading stopped."""

    name: str
    status: int | None = None
    ended: str | None = None  # "response", "eof", or the transport error's class name
    ended_at: float | None = None
    chunks: list[dict[str, Any]] = field(default_factory=list)


def _client(base_url: str) -> httpx.Client:
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=5.0)
    return httpx.Client(base_url=base_url, headers=ALPHA, timeout=timeout)


def post_once(base_url: str, path: str, body: dict[str, Any], outcome: Outcome) -> None:
    with _client(base_url) as client:
        try:
            outcome.status = client.post(path, json=body).status_code
            outcome.ended = "response"
        except httpx.TransportError as exc:
            outcome.ended = type(exc).__name__
    outcome.ended_at = time.monotonic()


def stream_chat(base_url: str, outcome: Outcome, first_chunk: threading.Event) -> None:
    with _client(base_url) as client:
        try:
            with client.stream("POST", "/inference/chat_completion", json=chat()) as response:
                outcome.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        outcome.chunks.append(json.loads(line.removeprefix("data: ")))
                        first_chunk.set()
            outcome.ended = "eof"
        except httpx.TransportError as exc:
            outcome.ended = type(exc).__name__
    outcome.ended_at = time.monotonic()
    first_chunk.set()  # also when it failed early: the waiter then reports the outcome


class WritingLoop:
    """Dataset creations back to back, each with its own uuid and row count, until the
    connection fails or `stop` is set: which were acknowledged, and the one in flight."""

    def __init__(self, base_url: str, writer: int, stop: threading.Event) -> None:
        self.base_url = base_url
        self.writer = writer
        self.stop = stop
        self.acknowledged: dict[str, int] = {}  # uuid -> row count
        self.unanswered: dict[str, int] = {}  # at most one: the request the kill cut
        self.refused: list[tuple[str, int]] = []
        self.outcome = Outcome(f"writer-{writer}")

    def run(self) -> None:
        with _client(self.base_url) as client:
            index = 0
            while not self.stop.is_set():
                uuid, rows = f"loop-{self.writer}-{index}", 1 + (index * 7 + self.writer) % 40
                body = {"uuid": uuid, "dataset": dataset(data_url(rows))}
                try:
                    response = client.post("/datasets/create", json=body)
                except httpx.TransportError as exc:
                    self.unanswered[uuid] = rows
                    self.outcome.ended = type(exc).__name__
                    break
                if response.status_code == 200:
                    self.acknowledged[uuid] = rows
                else:
                    self.refused.append((uuid, response.status_code))
                index += 1
            else:
                self.outcome.ended = "stopped"
        self.outcome.ended_at = time.monotonic()


def _until(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    return response.json() if response.content else None


# ---------------------------------------------------------------------- the test


@pytest.fixture
def chaos_model(serve_instance: None, database_url: str) -> Iterator[str]:
    """The name of the scripted model the API processes deploy, one Serve app per test:
    the replica goes on with a stream whose API process died (one stream at a time), so
    a shared one would still be busy with the previous test's. Deleted without waiting
    for that stream."""
    name = f"chaos-{make_url(database_url).get_backend_name()}"
    yield name
    serve.delete(f"llm-{name}", _blocking=False)


def test_a_sigkilled_api_server_ends_every_request_cleanly_and_keeps_exactly_what_it_acknowledged(
    settings: Settings,
    database_url: str,
    demo_model_dir: Path,
    ray_cluster: Any,
    ray_jobs_url: str,
    chaos_model: str,
    tmp_path: Path,
) -> None:
    config = {
        "ray_address": ray_cluster.address_info["address"],
        "ray_jobs_url": ray_jobs_url,
        "home": str(settings.home),
        "api_keys": API_KEYS,
        "dataset_root": settings.dataset_roots,
        "database_url": database_url,
        "model_name": chaos_model,
        "model_dir": str(demo_model_dir),
        "reply": REPLY,
        "seconds_per_step": SECONDS_PER_STEP,
    }
    log_path = tmp_path / "api.log"
    holding = HoldingDatasetServer()
    # Only asks Ray about the job (the API processes submit it): nothing reports here.
    launcher = RayJobLauncher(
        ray_jobs_url, internal_url="http://127.0.0.1:9", tokens=JobTokens(b"unused" * 8)
    )
    acked_job = f"{ACKED_JOB}-{time.monotonic_ns()}"  # unique: the Ray cluster is shared
    ray_id = ray_submission_id(TENANT, acked_job)
    started: list[ApiProcess] = []
    try:
        # --- 1. writes acknowledged before the chaos: a dataset, a job (then cancelled,
        # so it does not occupy the cluster).
        first = start_api(config, log_path)
        started.append(first)
        with _client(first.base_url) as api:
            body = {"uuid": "before", "dataset": dataset(data_url(3))}
            _ok(api.post("/datasets/create", json=body))
            _ok(
                api.post(
                    "/post_training/supervised_fine_tune/", json=sft_request(acked_job, data_url(2))
                )
            )
            assert (
                _ok(api.post("/post_training/job/cancel", json={"job_uuid": acked_job}))["status"]
                == "cancelled"
            )

        # --- 2. requests in flight, then SIGKILL.
        stream, first_chunk = Outcome("stream"), threading.Event()
        held = {name: Outcome(name) for name in [*HELD_DATASETS, HELD_JOB]}
        stop = threading.Event()
        loops = [WritingLoop(first.base_url, writer, stop) for writer in range(LOOP_WRITERS)]
        threads = [threading.Thread(target=stream_chat, args=(first.base_url, stream, first_chunk))]
        for name in HELD_DATASETS:
            body = {"uuid": name, "dataset": dataset(holding.url(name))}
            threads.append(
                threading.Thread(
                    target=post_once, args=(first.base_url, "/datasets/create", body, held[name])
                )
            )
        job_body = sft_request(HELD_JOB, holding.url(HELD_JOB))
        threads.append(
            threading.Thread(
                target=post_once,
                args=(
                    first.base_url,
                    "/post_training/supervised_fine_tune/",
                    job_body,
                    held[HELD_JOB],
                ),
            )
        )
        threads += [threading.Thread(target=loop.run) for loop in loops]
        for thread in threads:
            thread.start()

        assert first_chunk.wait(timeout=60), "no stream chunk within 60 s"
        assert stream.ended is None, stream  # still streaming
        holding.wait_for([*HELD_DATASETS, HELD_JOB], timeout_s=60)
        _until(
            f"{ACKS_BEFORE_KILL} acknowledged writes",
            lambda: sum(len(loop.acknowledged) for loop in loops) >= ACKS_BEFORE_KILL,
            timeout_s=60,
        )
        killed_at = first.kill()
        stop.set()  # a writer between two requests stops; one mid-request sees the kill
        for thread in threads:
            thread.join(timeout=CLEAN_END_S + 5)
        assert not any(thread.is_alive() for thread in threads), "a client hung after the kill"

        # Every request in flight ended cleanly and quickly: no hang, no timeout.
        in_flight = [stream, *held.values(), *(loop.outcome for loop in loops)]
        for outcome in in_flight:
            assert outcome.ended_at is not None and outcome.ended is not None, outcome
            assert "Timeout" not in outcome.ended, outcome
            assert outcome.ended_at - killed_at < CLEAN_END_S, outcome
        assert stream.status == 200 and stream.chunks, stream
        assert all(chunk["stop_reason"] == "not_stopped" for chunk in stream.chunks), (
            "the stream finished before the kill: it was not in flight"
        )
        for outcome in held.values():  # no answer came: the kill cut them
            assert outcome.status is None and outcome.ended != "response", outcome
        for loop in loops:
            assert loop.refused == [], loop.refused
        acknowledged = {"before": 3} | {
            u: n for loop in loops for u, n in loop.acknowledged.items()
        }
        unanswered = {u: n for loop in loops for u, n in loop.unanswered.items()}

        # --- 3. restart: what was acknowledged is there, once, whole; nothing else is.
        second = start_api(config, log_path)
        started.append(second)
        with _client(second.base_url) as api:
            for uuid, rows in acknowledged.items():
                got = _ok(api.get("/datasets/get", params={"dataset_id": uuid}))
                assert got["content_url"] == data_url(rows), uuid
            for name in HELD_DATASETS:
                assert api.get("/datasets/get", params={"dataset_id": name}).status_code == 404
            status = api.get("/post_training/job/status", params={"job_uuid": HELD_JOB})
            assert status.status_code == 404, status.text
            job = _ok(api.get("/post_training/job", params={"job_uuid": acked_job}))
            assert job["status"] == "cancelled", job
            # (No inference here: the replica runs one stream at a time and, until it stops
            # streams whose caller died, it is still busy with the stream the kill cut.)
        second.kill()

        # The SQL store itself: rows are whole, each once.
        database = Database(database_url)
        try:
            with database.transaction() as session:
                datasets = [
                    (row.tenant, row.uuid, row.row_count, row.content_url)
                    for row in session.scalars(select(Dataset))
                ]
                jobs = [(row.uuid, row.status, row.launch) for row in session.scalars(select(Job))]
                if database.backend == "sqlite":
                    assert session.scalar(text("PRAGMA integrity_check")) == "ok"
        finally:
            database.dispose()
        stored = {uuid: (rows, url) for _tenant, uuid, rows, url in datasets}
        assert len(stored) == len(datasets) and {t for t, *_ in datasets} == {TENANT}
        assert set(acknowledged) <= set(stored), set(acknowledged) - set(stored)
        assert set(stored) <= set(acknowledged) | set(unanswered), set(stored) - set(acknowledged)
        expected = acknowledged | unanswered
        for dataset_uuid, (row_count, url) in stored.items():
            wanted = expected[dataset_uuid]
            assert (row_count, url) == (wanted, data_url(wanted)), dataset_uuid
        ((job_uuid, job_status, launch),) = jobs
        assert (job_uuid, job_status) == (acked_job, "cancelled")
        assert launch is not None and len(launch["rows"]) == 2

        # One Ray job for the acknowledged submission, none for the one that was cut.
        submission_ids = [j.submission_id for j in JobSubmissionClient(ray_jobs_url).list_jobs()]
        assert submission_ids.count(ray_id) == 1
        assert ray_submission_id(TENANT, HELD_JOB) not in submission_ids
    finally:
        holding.close()
        for api_process in started:
            if api_process.process.poll() is None:
                api_process.kill()
        _until(
            f"Ray to stop {ray_id}",
            lambda: (info := launcher.info(ray_id)) is None or info.state.is_terminal,
            timeout_s=120,
        )
