"""Log set-up for `corral serve`: text (the default, for people) or one JSON object per
line (for a log pipeline), each record carrying the request id and job of the work it was
written for (`corral.observability.context`) when there is one."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from corral.observability.context import current

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Fields of every JSON line; `extra=` fields of a record (e.g. the access line's status)
# and the context's ids are added beside them.
JSON_FIELDS = ("asctime", "levelname", "name", "message")
CONTEXT_FIELDS = ("request_id", "job_uuid", "job_key")
# uvicorn's copy of its message with terminal colours: noise in a JSON line.
DROPPED_FIELDS = ("color_message",)


class ContextFilter(logging.Filter):
    """Copies the current context's ids onto each record (only those that are set), so
    a formatter can show them; a record that names its own (`extra=`) keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current()
        if context is not None:
            for field in CONTEXT_FIELDS:
                value = getattr(context, field)
                if value is not None and not hasattr(record, field):
                    setattr(record, field, value)
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        list(JSON_FIELDS),
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        reserved_attrs=[*RESERVED_ATTRS, *DROPPED_FIELDS],
    )


def log_handler(log_format: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) in `log_format`, with the context filter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(log_format: LogFormat, *, level: int | None = None) -> None:
    """Replace the root logger's handlers with one `log_handler`; `level` unchanged when
    None. Loggers that propagate (uvicorn's, when it is given no config of its own) end
    up there too."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(log_handler(log_format))
    if level is not None:
        root.setLevel(level)
