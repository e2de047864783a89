"""The request context, the log set-up and the metrics registry on their own (the routes
and middleware over HTTP: tests/api/test_ops.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from corral.config import Settings
from corral.observability.context import (
    WorkContext,
    accepted_request_id,
    bind_job,
    close_context,
    current,
    job_context,
    open_context,
)
from corral.observability.logs import configure_logging, log_handler
from corral.observability.metrics import ApiMetrics, JobsCollector, count_generated_tokens


def test_accepted_request_ids() -> None:
    assert accepted_request_id(b"abc-123") == "abc-123"
    assert accepted_request_id("A" * 64) == "A" * 64
    for unsafe in (None, b"", "A" * 65, b"a b", b"\xff\xfe", "x\ny", "-lead", "a/b"):
        made = accepted_request_id(unsafe)
        assert len(made) == 32 and int(made, 16) >= 0


def test_bind_job_names_the_job_of_the_current_request_only() -> None:
    bind_job(job_uuid="nowhere")  # no request: nothing to bind, nothing raised
    assert current() is None
    context = WorkContext(request_id="r1")
    token = open_context(context)
    try:
        bind_job(job_uuid="j1", job_key="tenant-1234abcd_j1")
    finally:
        close_context(token)
    assert (context.job_uuid, context.job_key) == ("j1", "tenant-1234abcd_j1")
    assert current() is None


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = log_handler("json", stream)
    logger = logging.getLogger("corral.test_observability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_only_the_ids_that_are_known(lines: io.StringIO) -> None:
    log = logging.getLogger("corral.test_observability")
    log.info("outside any work")
    with job_context(job_key="alpha-1234abcd_j9"):
        log.warning("settling %s", "j9")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"status": 500})
    outside, settling, failed = _records(lines)
    assert outside["message"] == "outside any work" and outside["level"] == "INFO"
    assert not {"request_id", "job_uuid", "job_key"} & set(outside)
    assert settling["job_key"] == "alpha-1234abcd_j9" and "request_id" not in settling
    assert settling["message"] == "settling j9"
    assert settling["logger"] == "corral.test_observability"
    assert failed["status"] == 500 and "ValueError: boom" in str(failed["exc_info"])


def test_configure_logging_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure_logging("json", level=logging.WARNING)
        (handler,) = root.handlers
        assert root.level == logging.WARNING
        assert isinstance(handler, logging.StreamHandler)
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
        assert json.loads(handler.format(record))["message"] == "hello you"
        configure_logging("text")
        (handler,) = root.handlers
        assert root.level == logging.WARNING  # unchanged without `level`
        assert handler.format(record).endswith("WARNING x: hello you")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def test_the_log_format_setting() -> None:
    assert Settings().log_format == "text"
    assert Settings(log_format="json").log_format == "json"
    with pytest.raises(ValidationError):
        Settings(log_format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings(readiness_timeout_s=0)


def test_apps_keep_their_metrics_apart_and_off_the_global_registry() -> None:
    first, second = ApiMetrics(), ApiMetrics()
    first.observe_request(method="GET", route="/health", status=200, seconds=0.01)
    assert b'corral_http_requests_total{method="GET",route="/health",status="200"} 1.0' in (
        first.exposition()
    )
    assert b"route=" not in second.exposition()
    assert REGISTRY.get_sample_value("corral_http_requests_total") is None
    count_generated_tokens("llm-x", 5)  # outside a request: counted nowhere
    assert b"llm-x" not in first.exposition() + second.exposition()


def test_the_jobs_collector_reads_at_each_scrape() -> None:
    counts = {("sft", "scheduled"): 2, ("sft", "running"): 1}
    metrics = ApiMetrics()
    text = metrics.exposition(JobsCollector(lambda: counts)).decode()
    assert 'corral_jobs{kind="sft",state="scheduled"} 2.0' in text
    assert "corral_jobs_queued 2.0" in text and "corral_store_up 1.0" in text
    counts[("sft", "scheduled")] = 0
    assert "corral_jobs_queued 0.0" in metrics.exposition(JobsCollector(lambda: counts)).decode()

    def broken() -> dict[tuple[str, str], int]:
        raise OSError("db.internal:5432 refused")

    down = metrics.exposition(JobsCollector(broken)).decode()
    assert "corral_store_up 0.0" in down and "corral_jobs{" not in down
