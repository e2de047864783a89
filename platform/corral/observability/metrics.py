"""Prometheus metrics of the API process, on a registry of each app's own (never the
process-wide default, so several apps in one process keep apart; Ray Serve's replicas
report through Ray's own metrics agent, not here).

- `corral_http_requests_total{method,route,status}` and
  `corral_http_request_duration_seconds{method,route}`: `route` is the matched route's
  template (`/jobs/{job_uuid}`), never the raw path, so ids do not become series;
  `unmatched` for a path no route has, `unauthenticated` for a request refused before
  routing (no valid key). A streamed response's duration runs to its last byte.
- `corral_generated_tokens_total{application}`: tokens generated for requests this
  process served, by Serve application (the `application` label of Ray Serve's metrics):
  the count the engine returns with each generation, or, for a stream cut short, the
  tokens streamed until then. Generation done inside Ray jobs (synthetic data runs) is
  not this process's and is not counted.
- `corral_jobs{kind,state}`, `corral_jobs_queued`, `corral_store_up`: read from the job
  store at each scrape (`JobsCollector`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar, Token

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
UNMATCHED = "unmatched"
UNAUTHENTICATED = "unauthenticated"
# Methods a client may send are any token; only these become label values.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# From a cheap read to a long generation or stream.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUED_STATE = "scheduled"

# (kind, state) -> number of jobs; every pair the store knows, zeros included.
JobCounts = Mapping[tuple[str, str], int]


class ApiMetrics:
    """The app's metrics and the registry they live on."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "corral_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "corral_http_request_duration_seconds",
            "Time from a request's arrival to its response's last byte.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "corral_http_requests_in_flight",
            "HTTP requests being served now.",
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "corral_generated_tokens",
            "Tokens generated for requests this API process served, by Serve application.",
            ["application"],
            registry=self.registry,
        )

    def observe_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    def exposition(self, *at_scrape: Collector) -> bytes:
        """The text format of this registry, then of `at_scrape` (collectors that read
        their values now, e.g. `JobsCollector`)."""
        text = generate_latest(self.registry)
        if at_scrape:
            scrape = CollectorRegistry(auto_describe=False)
            for collector in at_scrape:
                scrape.register(collector)
            text += generate_latest(scrape)
        return text


class JobsCollector(Collector):
    """Jobs by kind and state, jobs waiting to start, and whether the store answered,
    read through `counts` at scrape time. A store that fails reports `corral_store_up 0`
    and no job series (not zeros, which would look like an empty cluster)."""

    def __init__(self, counts: Callable[[], JobCounts]) -> None:
        self._counts = counts

    def describe(self) -> list[Metric]:
        return []  # nothing read at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("corral_store_up", "1 when the job store answered this scrape.")
        try:
            counts = self._counts()
        except Exception as exc:
            log.warning("metrics: the job store did not answer: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(
            "corral_jobs", "Jobs in the store, by kind and state.", labels=["kind", "state"]
        )
        for (kind, state), count in sorted(counts.items()):
            jobs.add_metric([kind, state], count)
        yield jobs
        yield GaugeMetricFamily(
            "corral_jobs_queued",
            "Jobs stored and not yet started (state scheduled).",
            value=sum(n for (_, state), n in counts.items() if state == QUEUED_STATE),
        )


# --- tokens: counted where a generation returns, for the app serving the request ---

_METRICS: ContextVar[ApiMetrics | None] = ContextVar("corral_api_metrics", default=None)


def use_metrics(metrics: ApiMetrics) -> Token[ApiMetrics | None]:
    """Make `metrics` the current request's (the middleware does, per request)."""
    return _METRICS.set(metrics)


def release_metrics(token: Token[ApiMetrics | None]) -> None:
    _METRICS.reset(token)


def count_generated_tokens(application: str | None, tokens: int) -> None:
    """Add `tokens` for `application` to the current request's app (a no-op outside a
    request, e.g. in a job)."""
    metrics = _METRICS.get()
    if metrics is not None and tokens > 0:
        metrics.generated_tokens.labels(application or "unknown").inc(tokens)
