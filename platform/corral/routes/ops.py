"""Probes and metrics for whoever runs Corral (not part of the Llama Stack spec, not in
the OpenAPI document). HTTP only.

- `GET /health`: liveness. Always 200 `{"status": "ok"}` while the process serves HTTP;
  it touches nothing else, so a slow database never gets a live server restarted.
- `GET /ready`: readiness (`corral.services.readiness`). 200 when every backend answered,
  else 503; either way each check's `ok`, and a generic `reason` for a failed one.
- `GET /metrics`: Prometheus' text format (`corral.observability.metrics`), for operator
  keys only (a tenant's key: 403).

`/health` and `/ready` need no key (`corral.auth.OPEN_PATHS`): probes carry none, and
they tell nothing but which backend is down."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from corral.deps import ApiMetricsDep, JobsServiceDep, OperatorDep, ReadinessDep
from corral.errors import Forbidden
from corral.observability.metrics import CONTENT_TYPE, JobsCollector

router = APIRouter(include_in_schema=False)


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(readiness: ReadinessDep) -> JSONResponse:
    results = await readiness.check()
    failed = [name for name, result in results.items() if not result.ok]
    checks = {
        name: {"ok": True} if result.ok else {"ok": False, "reason": result.reason}
        for name, result in results.items()
    }
    body: dict[str, object] = {"status": "not_ready" if failed else "ready", "checks": checks}
    if failed:
        body["failed"] = failed
    return JSONResponse(body, status_code=503 if failed else 200)


@router.get("/metrics")
def metrics(operator: OperatorDep, metrics: ApiMetricsDep, jobs: JobsServiceDep) -> Response:
    if not operator:
        raise Forbidden("the metrics need an operator key")
    return Response(metrics.exposition(JobsCollector(jobs.counts)), media_type=CONTENT_TYPE)
