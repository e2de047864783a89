"""The scripted demo behind the README's first command: build the demo model, start
`corral serve` on the embedded defaults, walk through a short session over HTTP, then the
whole fine-tuning loop: submit a LoRA job that teaches the demo model one answer, follow
its progress, serve the checkpoint it saved and ask it the question.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from corral.config import Settings
from corral.demo_model import build_demo_model, describe
from corral.ray_cluster import LocalRayHead
from corral.tenancy import tenant_dir

SERVER_START_TIMEOUT_S = 180.0
# The tenant of the demo's one API key.
DEMO_TENANT = "demo"
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
# What the fine-tuning part teaches: one answer, asked with and without a system prompt.
# Measured on the demo model: validation loss 6.17 -> 0.12 over these 8 epochs (96 steps
# on 2 workers), and greedy decoding then gives the answer exactly.
TEACH_QUESTION = "What is Corral?"
TEACH_ANSWER = "Corral trains models on Ray."
_TEACH_SYSTEMS = [
    "You are a helpful assistant.",
    "Be brief.",
    "Answer the question.",
    "You are Corral's assistant.",
    "Reply in one sentence.",
    "You are a friendly guide.",
    "You answer questions about software.",
    "Say it plainly.",
    None,
    None,
    None,
    None,
]
TUNED_MODEL = "llama3_8b_chat"


def teaching_dialogs() -> list[list[dict[str, str]]]:
    """The fine-tuning dataset's dialogs; the validation set asks without a system prompt."""
    turns = [
        {"role": "user", "content": TEACH_QUESTION},
        {"role": "assistant", "content": TEACH_ANSWER},
    ]
    return [
        ([{"role": "system", "content": system}] if system else []) + turns
        for system in _TEACH_SYSTEMS
    ]


def teaching_request(
    job_uuid: str, dataset: dict[str, Any], validation_dataset: dict[str, Any]
) -> dict[str, Any]:
    """A LoRA fine-tuning request (the spec's body) that teaches TEACH_ANSWER."""
    return {
        "job_uuid": job_uuid,
        "model": "llama3_8b",
        "dataset": dataset,
        "validation_dataset": validation_dataset,
        "algorithm": "lora",
        # The demo model's output layer is random: it learns slowly without an adapter.
        "algorithm_config": {
            "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
            "apply_lora_to_mlp": True,
            "apply_lora_to_output": True,
            "rank": 16,
            "alpha": 64,
        },
        "optimizer_config": {
            "optimizer_type": "adamw",
            "lr": 5e-3,
            "lr_min": 5e-4,
            "weight_decay": 0.0,
        },
        "training_config": {
            "n_epochs": 8,
            "batch_size": 1,
            "shuffle": True,
            "n_iters": 100,
            "enable_activation_checkpointing": False,
            "memory_efficient_fsdp_wrap": False,
            "fsdp_cpu_offload": False,
        },
        "hyperparam_search_config": {},
        "logger_config": {},
    }


def greedy_chat(model: str, question: str, *, max_tokens: int = 16) -> dict[str, Any]:
    """A spec chat completion request, greedy."""
    return {
        "model": model,
        "dialog": {"message": _message(question), "message_history": []},
        "sampling_params": {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0},
        "available_tools": [],
        "max_tokens": max_tokens,
        "stream": False,
        "logprobs": False,
    }


class DemoFailed(RuntimeError):
    pass


def listening_socket(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to `host:port` (0: a free port the kernel picks) and listening,
    to hand to `corral serve --fd`: the port stays bound from here on, so no other
    process can take it between picking it and serving on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve_command(sock: socket.socket) -> list[str]:
    """`corral serve` on an inherited socket (pass `pass_fds=(sock.fileno(),)`)."""
    return [sys.executable, "-m", "corral.cli", "serve", "--fd", str(sock.fileno())]


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


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]


@contextmanager
def corral_server(
    settings: Settings, *, api_key: str, port: int = 0, operator_key: str | None = None
) -> Iterator[RunningServer]:
    """`corral serve` on `settings.home` as a child process, until the block ends (SIGINT),
    on 127.0.0.1:`port` (0: a free port), bound here and inherited by the child.
    `api_key` is tenant DEMO_TENANT's; `operator_key`, if given, an operator's (tenant `ops`)."""
    env = os.environ | {
        "CORRAL_HOME": str(settings.home),
        "CORRAL_API_KEYS": f"{DEMO_TENANT}:{api_key}",
    }
    if operator_key is not None:
        env["CORRAL_OPERATOR_KEYS"] = f"ops:{operator_key}"
    log_path = settings.home / "demo-server.log"
    with listening_socket(port) as sock, log_path.open("ab") as log_file:
        process = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
            serve_command(sock),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(sock.fileno(),),
        )
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
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
        yield RunningServer(base_url, process)
    finally:
        process.send_signal(signal.SIGINT)  # nothing happens if it has exited already
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

    _say("2. Writing a small chat dataset in the demo tenant's own dataset directory")
    # Dataset roots are partitioned by tenant: `file://` URLs resolve only inside the
    # caller's own directory under a root.
    dataset_root = tenant_dir(settings.resolved_dataset_roots[0], DEMO_TENANT)
    dataset_root.mkdir(parents=True, exist_ok=True)
    dataset_file = dataset_root / "demo-chat.jsonl"
    dataset_file.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in DEMO_DIALOGS))
    _say(f"  {dataset_file} ({len(DEMO_DIALOGS)} rows)")
    teach_file = dataset_root / "demo-teach.jsonl"
    teach_file.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in teaching_dialogs()))

    _say("3. Starting `corral serve` (migrates the store, starts or joins the Ray head)")
    api_key, operator_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    try:
        with corral_server(
            settings, port=port, api_key=api_key, operator_key=operator_key
        ) as server:
            base_url = server.base_url
            _say(f"  serving on {base_url}")
            head = LocalRayHead(home).find()
            if head is not None:
                _say(f"  Ray head pid {head.pid} at {head.address}, dashboard {head.dashboard_url}")
            _say("4. A short session against the Llama Stack API")
            _session(base_url, api_key, operator_key, dataset_file)
            _say("5. Fine-tune the demo model, serve the result, ask it")
            _fine_tune(base_url, api_key, teach_file)
    finally:
        if not keep_ray:
            stopped = LocalRayHead(home).stop()
            _say("6. Stopped the embedded Ray head" if stopped else "6. No Ray head to stop")
    _say("Demo finished: every step answered as expected.")


def _session(base_url: str, api_key: str, operator_key: str, dataset_file: Path) -> None:
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
        chat = greedy_chat("llama3_8b_chat", "Hello! Who are you?")
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
        scale = {"model": "demo", "max_replicas": 3}
        _expect(
            api.post("/models/scale", json=scale),
            403,
            "a tenant key may not scale the shared demo model",
        )
        operator = {"Authorization": f"Bearer {operator_key}"}
        _expect(
            api.post("/models/scale", json=scale, headers=operator),
            200,
            "an operator key raises its replica bound in place (stored: it survives a restart)",
        )
        _expect(api.delete("/datasets/delete", params={"dataset_id": "demo-chat"}), 200, "delete")
        _expect(api.get("/datasets/get", params={"dataset_id": "demo-chat"}), 404, "it is gone")


def _fine_tune(base_url: str, api_key: str, teach_file: Path) -> None:
    from corral.cli_jobs import follow

    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=600) as api:
        dataset = {
            "columns": {"dialog": "dialog"},
            "content_url": teach_file.as_uri(),
            "metadata": {"purpose": "teach one answer"},
        }
        _expect(
            api.post("/datasets/create", json={"uuid": "demo-teach", "dataset": dataset}),
            200,
            "register the teaching dataset",
        )
        dataset = _expect(
            api.get("/datasets/get", params={"dataset_id": "demo-teach"}), 200, "read it back"
        )
        job_uuid = f"demo-sft-{secrets.token_hex(4)}"
        request = teaching_request(job_uuid, dataset, dataset)
        bad = request | {"hyperparam_search_config": {"lr": [1e-3, 1e-2]}}
        _expect(
            api.post("/post_training/supervised_fine_tune/", json=bad),
            422,
            "a sweep is refused up front",
        )
        _expect(
            api.post("/post_training/supervised_fine_tune/", json=request),
            200,
            "submit a LoRA fine-tuning job (it runs as a Ray job)",
        )
        _say("  progress (steps done / planned, last loss):")
        job = follow(api, job_uuid, out=sys.stdout, poll_s=1.0, timeout_s=900)
        if job["status"] != "completed":
            raise DemoFailed(f"the fine-tuning job ended {job['status']}: {job.get('error')}")
        logs = _expect(
            api.get("/post_training/job/logs", params={"job_uuid": job_uuid}), 200, "its log"
        )
        losses = [line for line in logs["log_lines"] if "validation loss" in line]
        _say(f"      {losses[0]} ... {losses[-1]}")
        artifacts = _expect(
            api.get("/post_training/job/artifacts", params={"job_uuid": job_uuid}),
            200,
            "its checkpoints",
        )
        adapter = Path(unquote(urlsplit(artifacts["checkpoints"][-1]["path"]).path))
        models = _expect(api.get("/models"), 200, "where the base model's weights are")
        base = next(m for m in models["data"] if m["name"] == "demo")["checkpoint_dir"]
        # Registered under the spec's model name, it answers for this tenant in place of
        # the file model of that name (until deleted).
        register = {
            "name": TUNED_MODEL,
            "checkpoint_dir": base,
            "adapter_dir": str(adapter),
            "source_job_uuid": job_uuid,
        }
        _expect(api.post("/models/register", json=register), 200, "serve the LoRA checkpoint")
        reply = _expect(
            api.post(
                "/inference/chat_completion", json=greedy_chat(register["name"], TEACH_QUESTION)
            ),
            200,
            f"ask the fine-tuned model {TEACH_QUESTION!r}",
        )
        _say(f"      it answers: {reply['content']!r}")
        if reply["content"].strip() != TEACH_ANSWER:
            raise DemoFailed(f"the fine-tuned model did not learn {TEACH_ANSWER!r}")
        _expect(
            api.delete("/models/delete", params={"model": register["name"]}),
            200,
            "stop serving it",
        )


def _message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "tool_calls": [], "tool_responses": []}
