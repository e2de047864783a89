"""Client-chosen identifiers: they become database keys and Ray submission ids, so they
are held to a conservative alphabet."""

from __future__ import annotations

import re

from corral.errors import InvalidRequest

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def check_id(value: str, *, what: str) -> str:
    if not _ID.fullmatch(value):
        raise InvalidRequest(
            f"{what} {value[:140]!r} is not valid: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value
