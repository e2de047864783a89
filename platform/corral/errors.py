"""Domain exceptions, and the one table that maps them to HTTP status codes."""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error a service raises on purpose; each maps to one HTTP status."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(CorralError):
    """The request is well-formed JSON but asks for something that cannot be done."""

    code = "invalid_request"


class NotFound(CorralError):
    code = "not_found"


class Conflict(CorralError):
    """The request collides with what is stored (e.g. same uuid, different body)."""

    code = "conflict"


class Unauthorized(CorralError):
    code = "unauthorized"


class Forbidden(CorralError):
    """The caller is known but may not do this (a tenant key on an operator action)."""

    code = "forbidden"


class QuotaExceeded(CorralError):
    """What a tenant asks for lies beyond a limit the operator set for each tenant (e.g.
    replicas or GPUs of its registered models); nothing was changed."""

    code = "quota_exceeded"


class JobTooLarge(InvalidRequest):
    """A job needs more than the cluster can ever give (its total, or its autoscaler's
    maximum): refused at submission rather than left to wait forever; nothing stored."""

    code = "job_too_large"


class ContentTooLarge(InvalidRequest):
    """What the request carries is over a size bound (a memory bank document)."""

    code = "content_too_large"


class ContentUnavailable(CorralError):
    """A URL the user gave could not be fetched or is not allowed."""

    code = "content_unavailable"


class Overloaded(CorralError):
    """Every replica of a model is busy and its queue is full: try again shortly."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(CorralError):
    """A service Corral runs on (Ray, its Jobs API) could not be reached or failed."""

    code = "backend_unavailable"


class EngineFailed(CorralError):
    """A model's engine raised something other than its refusal of a request: a bug on
    the server's side, logged where it is caught with the replica's traceback."""

    code = "engine_failed"


class PipelineFailed(CorralError):
    """A synthetic data pipeline's stage (generation, scoring, filtering) failed for a
    reason other than its model being unavailable (that is ModelUnavailable, 503): the
    run is refused whole, naming the stage, rather than answering short."""

    code = "pipeline_failed"

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"the {stage} stage failed: {detail}")
        self.stage = stage


class CapabilityUnavailable(CorralError):
    """An operation of the spec whose engine this build does not have yet."""

    code = "not_implemented"

    def __init__(self, capability: str, detail: str = "") -> None:
        message = f"capability {capability!r} is not available on this server"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.capability = capability


HTTP_STATUS: dict[type[CorralError], int] = {
    InvalidRequest: 422,
    JobTooLarge: 422,
    ContentTooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
    QuotaExceeded: 403,
    NotFound: 404,
    Conflict: 409,
    ContentUnavailable: 422,
    CapabilityUnavailable: 501,
    Overloaded: 503,
    BackendUnavailable: 503,
    EngineFailed: 500,
    PipelineFailed: 500,
}


def http_status_for(error: CorralError) -> int:
    """The status code for a domain error: the most specific class in `HTTP_STATUS` wins."""
    mro = type(error).__mro__
    matches = [(mro.index(cls), status) for cls, status in HTTP_STATUS.items() if cls in mro]
    return min(matches)[1] if matches else 500


def retry_after_s(error: CorralError) -> int | None:
    """When a client may try again (`Retry-After`): errors that are a passing condition
    of the server (Overloaded, a model app that failed to start) carry `retry_after_s`."""
    value = getattr(error, "retry_after_s", None)
    return value if isinstance(value, int) else None
