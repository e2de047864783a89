"""A test-only reward app: the reward app's `score` method, scoring by a rule, no model.

The score of a conversation is a stable function of its last message's text (the
candidate), spread over [0, 1), so candidates that differ get different scores. It records
how many calls it has running at once, and fails a conversation whose prompt asks for it:

- `fail-score` in the prompt: `score` raises RuntimeError (a reward model's bug);
- `refuse-score` in the prompt: `score` raises EngineRequestError (a request it refuses).
"""

from __future__ import annotations

import asyncio
import hashlib

from ray import serve
from ray.serve import Application

from serve_apps.engines.protocol import EngineRequestError, ScoringRequest


def rule_score(text: str) -> float:
    """The rule: the first 4 bytes of the text's SHA-256, as a fraction of 2^32."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") / 2**32


class RuleScorer:
    def __init__(self, seconds_per_call: float) -> None:
        self._seconds = seconds_per_call
        self._running = 0
        self._most_running = 0
        self._calls = 0

    async def score(self, request: ScoringRequest) -> float:
        prompt = " ".join(m.content for m in request.messages[:-1])
        if "refuse-score" in prompt:
            raise EngineRequestError("rule scorer refuses this conversation")
        if "fail-score" in prompt:
            raise RuntimeError("rule scorer bug: failed on purpose")
        self._running += 1
        self._calls += 1
        self._most_running = max(self._most_running, self._running)
        try:
            await asyncio.sleep(self._seconds)
            return rule_score(request.messages[-1].content)
        finally:
            self._running -= 1

    def stats(self) -> dict[str, int]:
        """Calls scored, and the most that ran at once."""
        return {"calls": self._calls, "most_running": self._most_running}


def build_rule_reward(seconds_per_call: float = 0.0) -> Application:
    deployment = serve.deployment(
        name="RuleScorer", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256
    )(RuleScorer)
    return deployment.bind(seconds_per_call)
