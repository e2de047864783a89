"""The reward app without Serve running: a bad conversation is refused before it joins a
batch, and the app's config and Serve options come from the shared plumbing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_apps.engines.protocol import EngineRequestError, ScoringRequest
from serve_apps.engines.scripted import ScriptedScoringEngine
from serve_apps.reward import (
    DEPLOYMENT_NAME,
    RewardAppConfig,
    RewardServer,
    build_app,
    engine_for,
    transformers_engine,
)


def _config(**overrides: Any) -> RewardAppConfig:
    return RewardAppConfig.model_validate(
        {"name": "r", "model_dir": "/unused", "max_batch_size": 4, "batch_wait_timeout_s": 0.2}
        | overrides
    )


def test_a_bad_conversation_is_refused_before_it_joins_a_batch() -> None:
    """Batches themselves need a replica (tests/api/test_reward_scoring_api.py shows
    them); the engine's check runs before, so a bad call fails alone."""
    server = RewardServer(_config(), lambda _config: ScriptedScoringEngine())
    with pytest.raises(EngineRequestError, match="at least one message"):
        asyncio.run(server.score(ScoringRequest(())))
    assert server.stats() == {"batch_sizes": []}


def test_config_and_deployment() -> None:
    with pytest.raises(ValueError):
        _config(adapter_dir="/adapter")  # the reward config takes no adapter
    with pytest.raises(ValueError):
        _config(score_weights={})
    assert engine_for(_config()) is transformers_engine
    deployment = build_app(_config().model_dump(), engine_factory=lambda c: ScriptedScoringEngine())
    options = deployment._bound_deployment
    assert options.name == DEPLOYMENT_NAME
    assert options.max_ongoing_requests >= 4
