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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from corral.api.inference import ChatCompletionResponse
from corral.client import CorralAPIError, CorralClient, WaitTimeout
from corral.config import Settings
from corral.demo_model import build_demo_model, describe
from corral.demo_reward import build_demo_reward_model
from corral.job_progress import follow
from corral.milvus_server import LocalMilvus
from corral.ray_cluster import LocalRayHead
from corral.serving.catalog import demo_model_dir, demo_reward_dir
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
    process can take it between picking it and serving on it. A port a killed server
    left in TIME_WAIT may be bound again (SO_REUSEADDR): a restarted API must come back
    where its running jobs report (docs/job_credentials.md)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


T = TypeVar("T")


class Transcript:
    """Each step of the session in one line: what it shows, the request the client made
    and the answer, checked against the status the step expects."""

    def __init__(self) -> None:
        self._last: httpx.Response | None = None

    def client(self, base_url: str, api_key: str | None, *, timeout_s: float) -> CorralClient:
        """A client whose every response this transcript sees."""
        return CorralClient(
            base_url, api_key=api_key, timeout_s=timeout_s, event_hooks={"response": [self._see]}
        )

    def _see(self, response: httpx.Response) -> None:
        self._last = response

    def step(self, what: str, call: Callable[[], T], *, status: int = 200) -> T | None:
        """Run `call`; returns its result, or None when the server refused it as expected."""
        self._last = None
        try:
            result: T | None = call()
        except CorralAPIError as exc:
            if exc.status is None:
                raise DemoFailed(f"{what}: {exc}") from None
            result = None
        response = self._last
        if response is None:
            raise DemoFailed(f"{what}: no request was made")
        mark = "ok " if response.status_code == status else "FAIL"
        try:
            shown = response.text[:160]
        except httpx.ResponseNotRead:  # a stream the call did not read
            shown = ""
        _say(
            f"  [{mark}] {what}: {response.request.method} {response.request.url.path} "
            f"-> {response.status_code} {shown}"
        )
        if response.status_code != status:
            raise DemoFailed(f"{what}: expected HTTP {status}, got {response.status_code}")
        return result


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]


@contextmanager
def corral_server(
    settings: Settings,
    *,
    api_key: str,
    port: int = 0,
    operator_key: str | None = None,
    start_timeout_s: float = SERVER_START_TIMEOUT_S,
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
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise DemoFailed(f"corral serve exited with {process.returncode}; see {log_path}")
            with CorralClient(base_url, timeout_s=2) as probe:
                if probe.health():
                    break
            if time.monotonic() > deadline:
                raise DemoFailed(f"corral serve did not answer within {start_timeout_s:g}s")
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
    model_dir = build_demo_model(demo_model_dir(home))
    _say(f"  {model_dir}: {describe(model_dir)}")
    _say("   and the demo reward model, trained here on its replies (prefers letters)")
    reward_dir = build_demo_reward_model(demo_reward_dir(home), policy_dir=model_dir)
    _say(f"  {reward_dir}: {describe(reward_dir)}")

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
            if LocalMilvus(home).stop():
                _say("   and the embedded Milvus Lite server")
    _say("Demo finished: every step answered as expected.")


def _session(base_url: str, api_key: str, operator_key: str, dataset_file: Path) -> None:
    dataset = {
        "columns": {"dialog": "dialog"},
        "content_url": dataset_file.as_uri(),
        "metadata": {"purpose": "demo"},
    }
    said = Transcript()
    with said.client(base_url, None, timeout_s=60) as anonymous:
        said.step(
            "no key is refused", lambda: anonymous.create_dataset("demo-chat", dataset), status=401
        )
    with (
        said.client(base_url, api_key, timeout_s=60) as api,
        said.client(base_url, operator_key, timeout_s=60) as operator,
    ):
        said.step("create a dataset", lambda: api.create_dataset("demo-chat", dataset))
        said.step(
            "the same create again is a no-op", lambda: api.create_dataset("demo-chat", dataset)
        )
        changed = dataset | {"metadata": {"purpose": "other"}}
        said.step(
            "same uuid, other body", lambda: api.create_dataset("demo-chat", changed), status=409
        )
        got = said.step("get it", lambda: api.get_dataset("demo-chat"))
        if got is None or got.model_dump(mode="json") != dataset:
            raise DemoFailed(f"stored dataset differs from what was sent: {got}")
        outside = dataset | {"content_url": "file:///etc/passwd"}
        said.step(
            "a file outside the root", lambda: api.create_dataset("escape", outside), status=422
        )
        metadata_url = dataset | {"content_url": "https://169.254.169.254/latest/meta-data"}
        said.step(
            "a metadata address", lambda: api.create_dataset("ssrf", metadata_url), status=422
        )
        said.step("status of an unknown job", lambda: api.job_status("no-such-job"), status=404)
        models = said.step("the models this server serves", api.list_models) or []
        _say("      " + ", ".join(f"{m.name} {m.aliases}" for m in models))
        chat = greedy_chat("llama3_8b_chat", "Hello! Who are you?")
        reply = said.step("chat", lambda: api.chat_completion(chat))
        _say(f"      the demo model (random weights until fine-tuned) says: {_content(reply)!r}")
        try:
            chunks = list(api.stream_chat_completion(chat))
        except CorralAPIError as exc:
            raise DemoFailed(f"streamed chat failed: {exc}") from None
        if not chunks:
            raise DemoFailed("streamed chat failed: no events")
        _say(f"  [ok ] streamed chat: {len(chunks)} server-sent events, token by token")
        openai_chat = {
            "model": "llama3_8b_chat",
            "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        said.step("OpenAI-compatible chat", lambda: api.openai_chat_completion(openai_chat))
        said.step(
            "a tenant key may not scale the shared demo model",
            lambda: api.scale_model("demo", max_replicas=3),
            status=403,
        )
        said.step(
            "an operator key raises its replica bound in place (stored: it survives a restart)",
            lambda: operator.scale_model("demo", max_replicas=3),
        )
        said.step("delete", lambda: api.delete_dataset("demo-chat"))
        said.step("it is gone", lambda: api.get_dataset("demo-chat"), status=404)


def _fine_tune(base_url: str, api_key: str, teach_file: Path) -> None:
    said = Transcript()
    with said.client(base_url, api_key, timeout_s=600) as api:
        dataset = {
            "columns": {"dialog": "dialog"},
            "content_url": teach_file.as_uri(),
            "metadata": {"purpose": "teach one answer"},
        }
        said.step(
            "register the teaching dataset", lambda: api.create_dataset("demo-teach", dataset)
        )
        stored = said.step("read it back", lambda: api.get_dataset("demo-teach"))
        assert stored is not None
        read_back = stored.model_dump(mode="json")
        job_uuid = f"demo-sft-{secrets.token_hex(4)}"
        request = teaching_request(job_uuid, read_back, read_back)
        bad = request | {"hyperparam_search_config": {"lr": [1e-3, 1e-2]}}
        said.step("a sweep is refused up front", lambda: api.submit_sft(bad), status=422)
        said.step(
            "submit a LoRA fine-tuning job (it runs as a Ray job)", lambda: api.submit_sft(request)
        )
        _say("  progress (steps done / planned, last loss):")
        try:
            job = follow(api, job_uuid, out=sys.stdout, poll_s=1.0, timeout_s=900)
        except WaitTimeout as exc:
            raise DemoFailed(str(exc)) from None
        if job.status != "completed":
            raise DemoFailed(f"the fine-tuning job ended {job.status}: {job.error}")
        log_lines = said.step("its log", lambda: api.job_logs(job_uuid)) or []
        losses = [line for line in log_lines if "validation loss" in line]
        _say(f"      {losses[0]} ... {losses[-1]}")
        artifacts = said.step("its checkpoints", lambda: api.job_artifacts(job_uuid))
        assert artifacts is not None
        adapter = Path(unquote(urlsplit(artifacts.checkpoints[-1].path).path))
        models = said.step("where the base model's weights are", api.list_models) or []
        base = next(m for m in models if m.name == "demo").checkpoint_dir
        # Registered under the spec's model name, it answers for this tenant in place of
        # the file model of that name (until deleted).
        register = {
            "name": TUNED_MODEL,
            "checkpoint_dir": base,
            "adapter_dir": str(adapter),
            "source_job_uuid": job_uuid,
        }
        said.step("serve the LoRA checkpoint", lambda: api.register_model(register))
        reply = said.step(
            f"ask the fine-tuned model {TEACH_QUESTION!r}",
            lambda: api.chat_completion(greedy_chat(TUNED_MODEL, TEACH_QUESTION)),
        )
        _say(f"      it answers: {_content(reply)!r}")
        if _content(reply).strip() != TEACH_ANSWER:
            raise DemoFailed(f"the fine-tuned model did not learn {TEACH_ANSWER!r}")
        said.step("stop serving it", lambda: api.delete_model(TUNED_MODEL))


def _content(reply: ChatCompletionResponse | None) -> str:
    """A reply's text (the demo asks for text, not attachments)."""
    return reply.content if reply is not None and isinstance(reply.content, str) else ""


def _message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "tool_calls": [], "tool_responses": []}
