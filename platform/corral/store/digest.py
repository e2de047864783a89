"""A stable fingerprint of a request body, for idempotent creation by client-chosen uuid."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def request_digest(body: Any) -> str:
    """sha256 of the canonical JSON of `body` (sorted keys, no insignificant whitespace)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
