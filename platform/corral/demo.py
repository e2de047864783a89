"""The scripted demo behind the README's first command: build the demo model, start
`corral serve` on the embedded defaults, and walk through a short session over HTTP.

Every step checks the answer it expects, so the demo fails loudly when Corral does not
do what it shows."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from corral.config import Settings
from corral.demo_model import build_demo_model, describe
from corral.ray_cluster import LocalRayHead

SERVER_START_TIMEOUT_S = 180.0
DEMO_DIALOGS = [
    [
        {"role": "user", "content": "What does Corral do?"},
        {"role": "assistant", "content": "It fine-tunes and serves Llama models on Ray."},
    ],
    [
        {"role": "user", "content": "Where is the job state kept?"},
        {"role": "assistant", "content": "In the SQL job store, the source of truth."},
    ],
]


class DemoFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _say(text: str) -> None:
    print(text, flush=True)


def _expect(response: httpx.Response, status: int, what: str) -> Any:
    body = response.json() if response.content else None
    mark = "ok " if response.status_code == status else "FAIL"
    shown = json.dumps(body)[:160] if body is not None else ""
    _say(
        f"  [{mark}] {what}: {response.request.method} {response.request.url.path} "
        f"-> {response.status_code} {shown}"
    )
    if response.status_code != status:
        raise DemoFailed(f"{what}: expected HTTP {status}, got {response.status_code}")
    return body


@contextmanager
def _server(settings: Settings, *, port: int, api_key: str) -> Iterator[str]:
    env = os.environ | {"CORRAL_HOME": str(settings.home), "CORRAL_API_KEYS": f"demo:{api_key}"}
    log_path = settings.home / "demo-server.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
            [sys.executable, "-m", "corral.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise DemoFailed(f"corral serve exited with {process.returncode}; see {log_path}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise DemoFailed(f"corral serve did not answer within {SERVER_START_TIMEOUT_S}s")
            time.sleep(0.5)
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_demo(settings: Settings, *, port: int = 0, keep_ray: bool = False) -> None:
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    _say(f"Corral demo — home {home}")

    _say("1. Building the demo model (Llama architecture, tokenizer trained here)")
    model_dir = build_demo_model(home / "models" / "demo")
    _say(f"  {model_dir}: {describe(model_dir)}")

    _say("2. Writing a small chat dataset under the allowed dataset root")
    dataset_root = settings.resolved_dataset_roots[0]
    dataset_root.mkdir(parents=True, exist_ok=True)
    dataset_file = dataset_root / "demo-chat.jsonl"
    dataset_file.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in DEMO_DIALOGS))
    _say(f"  {dataset_file} ({len(DEMO_DIALOGS)} rows)")

    _say("3. Starting `corral serve` (migrates the store, starts or joins the Ray head)")
    api_key = secrets.token_urlsafe(24)
    port = port or _free_port()
    try:
        with _server(settings, port=port, api_key=api_key) as base_url:
            _say(f"  serving on {base_url}")
            head = LocalRayHead(home).find()
            if head is not None:
                _say(f"  Ray head pid {head.pid} at {head.address}, dashboard {head.dashboard_url}")
            _say("4. A short session against the Llama Stack API")
            _session(base_url, api_key, dataset_file)
    finally:
        if not keep_ray:
            stopped = LocalRayHead(home).stop()
            _say("5. Stopped the embedded Ray head" if stopped else "5. No Ray head to stop")
    _say("Demo finished: every step answered as expected.")


def _session(base_url: str, api_key: str, dataset_file: Path) -> None:
    dataset = {
        "columns": {"dialog": "dialog"},
        "content_url": dataset_file.as_uri(),
        "metadata": {"purpose": "demo"},
    }
    create = {"uuid": "demo-chat", "dataset": dataset}
    with httpx.Client(base_url=base_url, timeout=60) as anonymous:
        _expect(anonymous.post("/datasets/create", json=create), 401, "no key is refused")
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as api:
        _expect(api.post("/datasets/create", json=create), 200, "create a dataset")
        _expect(api.post("/datasets/create", json=create), 200, "the same create again is a no-op")
        changed = {"uuid": "demo-chat", "dataset": dataset | {"metadata": {"purpose": "other"}}}
        _expect(api.post("/datasets/create", json=changed), 409, "same uuid, other body")
        got = _expect(api.get("/datasets/get", params={"dataset_id": "demo-chat"}), 200, "get it")
        if got != dataset:
            raise DemoFailed(f"stored dataset differs from what was sent: {got}")
        outside = {"uuid": "escape", "dataset": dataset | {"content_url": "file:///etc/passwd"}}
        _expect(api.post("/datasets/create", json=outside), 422, "a file outside the root")
        metadata_url = {
            "uuid": "ssrf",
            "dataset": dataset | {"content_url": "https://169.254.169.254/latest/meta-data"},
        }
        _expect(api.post("/datasets/create", json=metadata_url), 422, "a metadata address")
        _expect(
            api.get("/post_training/job/status", params={"job_uuid": "no-such-job"}),
            404,
            "status of an unknown job",
        )
        models = _expect(api.get("/models"), 200, "the models this server serves")
        _say("      " + ", ".join(f"{m['name']} {m.get('aliases', [])}" for m in models["data"]))
        chat = {
            "model": "llama3_8b_chat",
            "dialog": {"message": _message("Hello! Who are you?"), "message_history": []},
            "sampling_params": {
                "temperature": 0.0,
                "strategy": "greedy",
                "top_p": 0.95,
                "top_k": 0,
            },
            "available_tools": [],
            "max_tokens": 16,
            "stream": False,
            "logprobs": False,
        }
        reply = _expect(api.post("/inference/chat_completion", json=chat), 200, "chat")
        _say(f"      the demo model (random weights until fine-tuned) says: {reply['content']!r}")
        with api.stream("POST", "/inference/chat_completion", json=chat | {"stream": True}) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        if r.status_code != 200 or not chunks:
            raise DemoFailed(f"streamed chat failed: HTTP {r.status_code}")
        _say(f"  [ok ] streamed chat: {len(chunks)} server-sent events, token by token")
        openai_chat = {
            "model": "llama3_8b_chat",
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        _expect(api.post("/v1/chat/completions", json=openai_chat), 200, "OpenAI-compatible chat")
        _expect(
            api.post("/models/scale", json={"model": "demo", "max_replicas": 3}),
            200,
            "raise the demo model's replica bound in place",
        )
        _expect(api.delete("/datasets/delete", params={"dataset_id": "demo-chat"}), 200, "delete")
        _expect(api.get("/datasets/get", params={"dataset_id": "demo-chat"}), 404, "it is gone")


def _message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "tool_calls": [], "tool_responses": []}
