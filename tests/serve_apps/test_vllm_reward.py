"""The reward kind on vLLM's pooling runner, its replica in the vLLM env, against the
transformers reward engine on the same model and conversations. The model is a seeded
random reward head over a head_dim-32 body (vLLM's CPU attention needs at least 32)
with the demo tokenizer and chat template: parity needs its shape, not its judgement."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import serve
from ray.serve.handle import DeploymentHandle

from corral.demo_reward import build_untrained_reward_model
from serve_apps.engines.protocol import ChatMessage, EngineRequestError, ScoringRequest
from serve_apps.engines.transformers_reward import (
    TransformersRewardEngine,
    TransformersRewardEngineConfig,
)
from serve_apps.reward import RewardAppConfig, build_app
from tests.serve_apps.vllm_env import vllm_python_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Both fp32 on CPU, different kernels: equal to rounding.
SCORE_TOLERANCE = 1e-4
CONVERSATIONS = [
    ScoringRequest(
        messages=(
            ChatMessage("user", "What is the capital of France?"),
            ChatMessage("assistant", answer),
        )
    )
    for answer in ("The capital of France is Paris.", "Bananas.", "I do not know, sorry.")
] + [
    ScoringRequest(
        messages=(
            ChatMessage("system", "Answer briefly."),
            ChatMessage("user", "Say hello to the robot."),
            ChatMessage("assistant", "Hello, robot! How are you today?"),
        )
    )
]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory, answering_model_dir: Path) -> Path:
    # Its tokenizer and chat template; 4 heads over 128: head_dim 32.
    destination = tmp_path_factory.mktemp("vllm-reward") / "reward"
    return build_untrained_reward_model(answering_model_dir, destination, hidden_size=128)


@pytest.fixture(scope="module")
def vllm_reward_app(serve_instance: None, reward_dir: Path) -> Iterator[DeploymentHandle]:
    python = vllm_python_or_skip()
    config = {
        "name": "vllm-reward",
        "model_dir": str(reward_dir),
        "engine": "vllm",
        "device": "cpu",
        "vllm_python": str(python),
        "cpus_per_replica": 0.5,
    }
    app_name = f"reward-{RewardAppConfig.model_validate(config).name}"
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    try:
        yield handle
    finally:
        serve.delete(app_name)


def test_scores_match_the_transformers_engine(
    vllm_reward_app: DeploymentHandle, reward_dir: Path
) -> None:
    reference = TransformersRewardEngine(
        TransformersRewardEngineConfig(model_dir=reward_dir, device="cpu")
    ).score(CONVERSATIONS)
    # Concurrent calls: the replica's batch queue hands vLLM several at once.
    responses = [vllm_reward_app.score.remote(request) for request in CONVERSATIONS]
    ours = [response.result() for response in responses]
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < SCORE_TOLERANCE
    assert len({round(score, 3) for score in ours}) > 1  # the scores tell answers apart


def test_bad_conversations_are_refused(vllm_reward_app: DeploymentHandle) -> None:
    with pytest.raises(EngineRequestError, match="at least one message"):
        vllm_reward_app.score.remote(ScoringRequest(messages=())).result()
    with pytest.raises(EngineRequestError, match="cannot be scored"):
        vllm_reward_app.score.remote(ScoringRequest(messages=(ChatMessage("robot", "x"),))).result()
