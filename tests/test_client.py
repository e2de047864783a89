"""corral.client against httpx's MockTransport: what a refusal, an answer that is not
Corral's and an unreachable server become, and the calls that follow pages or streams."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from corral.client import DEFAULT_URL, CorralAPIError, CorralClient, WaitTimeout


def client_on(handler: Callable[[httpx.Request], httpx.Response]) -> CorralClient:
    return CorralClient("http://corral.test", api_key="k", transport=httpx.MockTransport(handler))


def test_a_refusal_carries_status_code_and_message() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer k"
        body = {"error": {"code": "conflict", "message": "dataset 'd' exists with another body"}}
        return httpx.Response(409, json=body)

    with client_on(refuse) as corral, pytest.raises(CorralAPIError) as caught:
        corral.create_dataset("d", {"columns": {}, "content_url": "file:///d", "metadata": {}})
    error = caught.value
    assert (error.status, error.code) == (409, "conflict")
    assert error.message == "dataset 'd' exists with another body"
    assert str(error) == "POST /datasets/create: 409 dataset 'd' exists with another body"


def test_an_answer_that_is_not_corrals_keeps_its_text() -> None:
    with (
        client_on(lambda _r: httpx.Response(502, text="Bad Gateway from the proxy")) as corral,
        pytest.raises(CorralAPIError) as caught,
    ):
        corral.get_job("j")
    assert (caught.value.status, caught.value.code) == (502, None)
    assert caught.value.message == "Bad Gateway from the proxy"


def test_an_unreachable_server_has_no_status() -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with client_on(unreachable) as corral:
        with pytest.raises(CorralAPIError, match="cannot reach the Corral server") as caught:
            corral.list_models()
        assert caught.value.status is None
        assert corral.health() is False


def test_job_metrics_follow_every_page() -> None:
    records = [
        {"step": s, "epoch": 0, "recorded_at": "2026-12-01T12:00:00Z", "values": {"loss": 1 / s}}
        for s in range(1, 6)
    ]
    seen: list[dict[str, str]] = []

    def pages(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/jobs/j/metrics"
        params = dict(request.url.params)
        seen.append(params)
        after, limit = int(params.get("after_step", 0)), int(params["limit"])
        page = [r for r in records if r["step"] > after][:limit]
        more = page and page[-1]["step"] < records[-1]["step"]
        body = {
            "job_uuid": "j",
            "data": page,
            "next_after_step": page[-1]["step"] if more else None,
        }
        return httpx.Response(200, json=body)

    with client_on(pages) as corral:
        got = list(corral.job_metrics("j", page_size=2))
    assert [r.step for r in got] == [1, 2, 3, 4, 5]
    assert got[1].values == {"loss": 0.5}
    assert [p.get("after_step") for p in seen] == [None, "2", "4"]


def test_a_streamed_chat_is_one_chunk_per_event() -> None:
    events = [{"text_delta": "Hel"}, {"text_delta": "lo", "stop_reason": "finished_ok"}]

    def stream(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with client_on(stream) as corral:
        chunks = list(corral.stream_chat_completion({"model": "m"}))
    assert [c.text_delta for c in chunks] == ["Hel", "lo"]


def test_following_a_job_stops_at_its_end_or_its_time_limit() -> None:
    statuses = iter(["scheduled", "running", "completed"])

    def job(request: httpx.Request) -> httpx.Response:
        status = next(statuses, "running")
        body = {
            "job_uuid": "j",
            "kind": "supervised_fine_tune",
            "status": status,
            "scheduled_at": "2026-12-01T12:00:00Z",
            "attempt": 1,
            "checkpoints": 0,
        }
        return httpx.Response(200, json=body)

    with client_on(job) as corral:
        assert [j.status for j in corral.follow_job("j", poll_s=0)] == [
            "scheduled",
            "running",
            "completed",
        ]
        with pytest.raises(WaitTimeout, match="j still running after 0 s"):
            list(corral.follow_job("j", poll_s=0, timeout_s=0))


def test_the_cli_and_the_client_default_to_the_same_server() -> None:
    from corral.cli.remote import DEFAULT_URL as CLI_DEFAULT_URL
    from corral.cli.serve import DEFAULT_HOST, DEFAULT_PORT

    assert DEFAULT_URL == CLI_DEFAULT_URL == f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
