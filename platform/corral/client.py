"""A Python client of a running Corral server, over httpx: one typed method per call the
`corral` CLI and the demo make, and one error type for every refusal.

    from corral.client import CorralClient

    with CorralClient("http://127.0.0.1:8321", api_key="SECRET") as corral:
        corral.submit_sft(request)  # the spec's request body, as a dict
        for job in corral.follow_job(request["job_uuid"]):
            print(job.status, job.progress)

Responses are parsed into the server's own API models (`corral.api`), so a field the
server renames breaks type checking here, not a user's script at run time. A request
the server refuses raises `CorralAPIError` with the HTTP status, Corral's error code
(`{"error": {"code", "message"}}`) and its message; a server that cannot be reached
raises it with no status. Anything the typed methods do not cover goes through `http`,
the underlying `httpx.Client`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from corral.api.datasets import CreateDatasetRequest, Dataset
from corral.api.inference import ChatCompletionResponse, ChatCompletionResponseStreamChunk
from corral.api.jobs import JobList, JobLogs, JobMetric, JobMetrics, JobStatusName, JobSummary
from corral.api.models import ModelInfo, ModelList, ScaleModelResponse
from corral.api.openai import ChatCompletion
from corral.api.post_training import (
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
)
from corral.api.synthetic_data_generation import SyntheticDataGenerationResponse

DEFAULT_URL = "http://127.0.0.1:8321"
# Long: registering and scaling a model wait on Ray Serve, submitting a job on Ray.
DEFAULT_TIMEOUT_S = 600.0
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

# A request body: the spec's JSON as a mapping, or one of corral.api's models.
Body = Mapping[str, Any] | BaseModel
Response = TypeVar("Response", bound=BaseModel)


class CorralAPIError(Exception):
    """The server refused a request (`status`, `code` and `message` from its error body),
    or could not be reached (`status` and `code` are None)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.code = code
        self.method = method
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.status is None or self.method is None:
            return self.message
        return f"{self.method} {self.path}: {self.status} {self.message}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> CorralAPIError:
        code, message = None, response.text[:500] or response.reason_phrase
        try:
            detail = response.json()["error"]
            code, message = str(detail["code"]), str(detail["message"])
        except (ValueError, KeyError, TypeError):
            pass  # not Corral's error body (a proxy's page, say): the text is the message
        return cls(
            message,
            status=response.status_code,
            code=code,
            method=response.request.method,
            path=response.request.url.path,
        )


class WaitTimeout(TimeoutError):
    """A wait (for a job to end, for replicas to start) ran past its time limit."""


class CorralClient:
    """A Corral server at `base_url`, as the tenant (or operator) whose bearer key is
    `api_key`. Close it, or use it as a context manager."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        event_hooks: Mapping[str, list[Any]] | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url,
            headers=headers,
            timeout=timeout_s,
            transport=transport,
            event_hooks=event_hooks,
        )
        self._owns_http = True

    @classmethod
    def over(cls, http: httpx.Client) -> CorralClient:
        """A client on an httpx client configured elsewhere (e.g. FastAPI's TestClient);
        closing this one leaves that one open."""
        client = cls.__new__(cls)
        client.http = http
        client._owns_http = False
        return client

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- the server

    def health(self) -> bool:
        """Whether the server answers (`GET /health`); False where it cannot be reached."""
        try:
            answer = self._request("GET", "/health").json()
        except CorralAPIError:
            return False
        return isinstance(answer, dict) and answer.get("status") == "ok"

    # -------------------------------------------------------------- models

    def list_models(self) -> list[ModelInfo]:
        return self._get("/models", ModelList).data

    def find_model(self, name: str) -> ModelInfo | None:
        """The model `name` names (a name or an alias), as this caller sees it: a tenant's
        registered model shadows a file model of the same name."""
        models = sorted(self.list_models(), key=lambda m: m.source != "registered")
        return next((m for m in models if name == m.name or name in m.aliases), None)

    def register_model(self, request: Body) -> ModelInfo:
        """Serve a checkpoint (or a LoRA adapter over it): `POST /models/register`."""
        return ModelInfo.model_validate_json(
            self._request("POST", "/models/register", json=_json(request)).content
        )

    def scale_model(
        self,
        model: str,
        *,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        replicas: int | None = None,
    ) -> ScaleModelResponse:
        bounds = {"min_replicas": min_replicas, "max_replicas": max_replicas, "replicas": replicas}
        body = {"model": model} | {k: v for k, v in bounds.items() if v is not None}
        return ScaleModelResponse.model_validate_json(
            self._request("POST", "/models/scale", json=body).content
        )

    def delete_model(self, model: str) -> None:
        self._request("DELETE", "/models/delete", params={"model": model})

    def wait_for_replicas(self, model: str, *, timeout_s: float, poll_s: float = 1.0) -> ModelInfo:
        """Poll until the model's running replicas lie within its bounds (at least one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.find_model(model)
            if info is None:
                raise CorralAPIError(f"no model {model!r}", code="not_found")
            if max(1, info.min_replicas) <= info.replicas <= info.max_replicas:
                return info
            if time.monotonic() > deadline:
                raise WaitTimeout(
                    f"{model}: {info.replicas} replicas running after {timeout_s:g} s, "
                    f"bounds {info.min_replicas}..{info.max_replicas}"
                )
            time.sleep(poll_s)

    # -------------------------------------------------------------- jobs

    def submit_sft(self, request: Body) -> str:
        """Submit a supervised fine-tuning job (the spec's request); returns its uuid."""
        body = _json(request)
        self._request("POST", "/post_training/supervised_fine_tune/", json=body)
        return str(body["job_uuid"])

    def submit_dpo(self, request: Body) -> str:
        """Submit a preference-optimization (DPO) job; returns its uuid."""
        body = _json(request)
        self._request("POST", "/post_training/preference_optimize/", json=body)
        return str(body["job_uuid"])

    def list_jobs(
        self,
        *,
        status: list[JobStatusName] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> JobList:
        """One page of the caller's jobs, newest first (`next_offset` for the next)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._get("/jobs", JobList, params=params)

    def get_job(self, job_uuid: str) -> JobSummary:
        """Corral's view of a job of any kind: its lifecycle, error and progress."""
        return self._get(f"/jobs/{quote(job_uuid, safe='')}", JobSummary)

    def job_status(self, job_uuid: str) -> PostTrainingJobStatusResponse:
        """The spec's view of a job (no `cancelled`: it reads `failed`)."""
        return self._get(
            "/post_training/job/status",
            PostTrainingJobStatusResponse,
            params={"job_uuid": job_uuid},
        )

    def job_logs(self, job_uuid: str) -> list[str]:
        """A job's log lines (any kind)."""
        return self._get(f"/jobs/{quote(job_uuid, safe='')}/logs", JobLogs).log_lines

    def job_artifacts(self, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        return self._get(
            "/post_training/job/artifacts",
            PostTrainingJobArtifactsResponse,
            params={"job_uuid": job_uuid},
        )

    def job_metrics_page(
        self, job_uuid: str, *, after_step: int | None = None, limit: int | None = None
    ) -> JobMetrics:
        """One page of a job's per-step metrics, by step, after `after_step`."""
        params: dict[str, Any] = {}
        if after_step is not None:
            params["after_step"] = after_step
        if limit is not None:
            params["limit"] = limit
        return self._get(f"/jobs/{quote(job_uuid, safe='')}/metrics", JobMetrics, params=params)

    def job_metrics(
        self, job_uuid: str, *, after_step: int | None = None, page_size: int | None = None
    ) -> Iterator[JobMetric]:
        """Every per-step record of a job after `after_step`, following the pages."""
        while True:
            page = self.job_metrics_page(job_uuid, after_step=after_step, limit=page_size)
            yield from page.data
            if page.next_after_step is None:
                return
            after_step = page.next_after_step

    def cancel_job(self, job_uuid: str) -> JobSummary:
        """Cancel a job of any kind; its summary afterwards."""
        response = self._request("POST", f"/jobs/{quote(job_uuid, safe='')}/cancel")
        return JobSummary.model_validate_json(response.content)

    def follow_job(
        self, job_uuid: str, *, poll_s: float = 1.0, timeout_s: float | None = None
    ) -> Iterator[JobSummary]:
        """The job's summary every `poll_s` seconds; the last one yielded has ended."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        while True:
            job = self.get_job(job_uuid)
            yield job
            if job.status in TERMINAL_STATUSES:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"{job_uuid} still {job.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    # -------------------------------------------------------------- synthetic data

    def submit_generation_job(self, request: Body) -> JobSummary:
        """Run a synthetic data generation request as a job (Corral's
        `/synthetic_data_generation/jobs`: the spec's request, a `job_uuid`, an
        `output`); the job's summary. Follow it with `follow_job`."""
        response = self._request("POST", "/synthetic_data_generation/jobs", json=_json(request))
        return JobSummary.model_validate_json(response.content)

    def generate_synthetic_data(self, request: Body) -> SyntheticDataGenerationResponse:
        """The spec's synchronous generation (small requests; large ones are jobs)."""
        response = self._request("POST", "/synthetic_data_generation/generate", json=_json(request))
        return SyntheticDataGenerationResponse.model_validate_json(response.content)

    # -------------------------------------------------------------- inference

    def chat_completion(self, request: Body) -> ChatCompletionResponse:
        """The spec's chat completion (`stream` false)."""
        return ChatCompletionResponse.model_validate_json(
            self._request("POST", "/inference/chat_completion", json=_json(request)).content
        )

    def stream_chat_completion(self, request: Body) -> Iterator[ChatCompletionResponseStreamChunk]:
        """The spec's chat completion streamed: one chunk per server-sent event."""
        body = _json(request) | {"stream": True}
        with self._stream("POST", "/inference/chat_completion", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    yield ChatCompletionResponseStreamChunk.model_validate_json(line[6:])

    def openai_chat_completion(self, request: Body) -> ChatCompletion:
        """OpenAI's chat completion (`POST /v1/chat/completions`), not streamed."""
        return ChatCompletion.model_validate_json(
            self._request("POST", "/v1/chat/completions", json=_json(request)).content
        )

    # -------------------------------------------------------------- datasets

    def create_dataset(self, uuid: str, dataset: Dataset | Mapping[str, Any]) -> None:
        """Register a dataset; the same body again is a no-op, another body a 409."""
        body = CreateDatasetRequest(uuid=uuid, dataset=Dataset.model_validate(dataset))
        self._request("POST", "/datasets/create", json=_json(body))

    def get_dataset(self, uuid: str) -> Dataset:
        return self._get("/datasets/get", Dataset, params={"dataset_id": uuid})

    def delete_dataset(self, uuid: str) -> None:
        self._request("DELETE", "/datasets/delete", params={"dataset_id": uuid})

    # -------------------------------------------------------------- HTTP

    def _get(
        self, path: str, model: type[Response], *, params: Mapping[str, Any] | None = None
    ) -> Response:
        return model.model_validate_json(self._request("GET", path, params=params).content)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise CorralAPIError.from_response(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    response.read()
                    raise CorralAPIError.from_response(response)
                yield response
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.HTTPError) -> CorralAPIError:
        return CorralAPIError(f"cannot reach the Corral server at {self.http.base_url}: {exc}")


def _json(body: Body) -> dict[str, Any]:
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json")
    return dict(body)
