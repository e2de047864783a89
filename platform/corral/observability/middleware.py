"""One ASGI middleware, outermost but for Starlette's error handler: a context per request
(its id taken from a safe `X-Request-ID` or made, and echoed on the response), the
request's metrics, and one access line (`corral.access`) carrying the route template,
status and duration."""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.observability.context import (
    REQUEST_ID_HEADER,
    WorkContext,
    accepted_request_id,
    close_context,
    open_context,
)
from corral.observability.metrics import (
    UNAUTHENTICATED,
    UNMATCHED,
    ApiMetrics,
    release_metrics,
    use_metrics,
)

access_log = logging.getLogger("corral.access")


def route_label(scope: Scope, status: int) -> str:
    """The template of the route that took the request (set on the scope by routing)."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    return UNAUTHENTICATED if status == 401 else UNMATCHED


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_id = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode())
        context = WorkContext(request_id=accepted_request_id(raw_id))
        status = 500  # unless a response starts
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = str(context.request_id)
            await send(message)

        context_token = open_context(context)
        metrics_token = use_metrics(self.metrics)
        self.metrics.http_in_flight.inc()
        failed = False
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # The context stays for Starlette's error handler, which logs the error
            # (with this request's id) after this frame; the task ends with the request.
            failed = True
            raise
        finally:
            self.metrics.http_in_flight.dec()
            seconds = time.perf_counter() - started
            route = route_label(scope, status)
            method = str(scope.get("method", ""))
            self.metrics.observe_request(method=method, route=route, status=status, seconds=seconds)
            access_log.info(
                "%s %s %d %.1f ms",
                method,
                route,
                status,
                seconds * 1000,
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                },
            )
            if not failed:
                release_metrics(metrics_token)
                close_context(context_token)
