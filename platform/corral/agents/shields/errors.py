"""What a shield fails with when it cannot judge a message."""

from __future__ import annotations

from corral.errors import BackendUnavailable


class ShieldFailed(BackendUnavailable):
    """A shield ran and could not reach a verdict (its model answered something that is
    no verdict): 503, like an unreachable model. Never a pass."""
