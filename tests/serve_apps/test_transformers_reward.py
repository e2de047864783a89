"""The transformers scoring engine on tiny real reward models: scores equal the model run
in-process on the chat template's text, batching changes nothing, several labels combine
by their weights, and bad requests or configurations are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from serve_apps.engines.labels import label_weights
from serve_apps.engines.protocol import ChatMessage, EngineRequestError, ScoringRequest
from serve_apps.engines.transformers_reward import (
    TransformersRewardEngine,
    TransformersRewardEngineConfig,
)

# Scores of a padded batch against the same conversations alone (fp32, CPU).
TOLERANCE = 1e-5


def conversation(reply: str, question: str = "What is 2 + 2?") -> ScoringRequest:
    return ScoringRequest(
        messages=(
            ChatMessage("system", "You are terse."),
            ChatMessage("user", question),
            ChatMessage("assistant", reply),
        )
    )


REQUESTS = [
    conversation("4"),
    conversation("It is four, as anyone who has counted on their fingers knows well."),
    conversation("five"),
    ScoringRequest((ChatMessage("user", "hi"), ChatMessage("assistant", "hello"))),
]


def in_process(model_dir: Path, request: ScoringRequest) -> torch.Tensor:
    """The model's logits for one conversation, as a user would compute them."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).train(False)
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in request.messages], tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        logits: torch.Tensor = model(**ids).logits[0]
    return logits


@pytest.fixture(scope="module")
def engine(reward_model_dir: Path) -> TransformersRewardEngine:
    return TransformersRewardEngine(TransformersRewardEngineConfig(model_dir=reward_model_dir))


def test_scores_equal_the_model_in_process(
    engine: TransformersRewardEngine, reward_model_dir: Path
) -> None:
    scores = engine.score(REQUESTS)
    expected = [float(in_process(reward_model_dir, r)[0]) for r in REQUESTS]
    assert scores == pytest.approx(expected, abs=TOLERANCE)
    assert len({round(s, 4) for s in scores}) == len(scores)  # the replies score differently


def test_a_batch_scores_as_each_alone(engine: TransformersRewardEngine) -> None:
    alone = [engine.score([r])[0] for r in REQUESTS]
    assert engine.score(REQUESTS) == pytest.approx(alone, abs=TOLERANCE)
    assert engine.score([]) == []


def test_several_labels_combine_by_their_weights(attribute_reward_model_dir: Path) -> None:
    weights = {"helpfulness": 1.0, "correctness": 0.5, "verbosity": -2.0}
    engine = TransformersRewardEngine(
        TransformersRewardEngineConfig(model_dir=attribute_reward_model_dir, score_weights=weights)
    )
    for request, score in zip(REQUESTS, engine.score(REQUESTS), strict=True):
        logits = in_process(attribute_reward_model_dir, request)
        expected = float(logits[0] * 1.0 + logits[1] * 0.5 - logits[2] * 2.0)
        assert score == pytest.approx(expected, abs=TOLERANCE)


def test_label_weights() -> None:
    labels = {0: "a", 1: "b", 2: "c"}
    assert label_weights({0: "reward"}, None) == [1.0]
    assert label_weights(labels, {"c": 2.0, "a": -1.0}) == [-1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="3 labels"):
        label_weights(labels, None)
    with pytest.raises(ValueError, match="lacks: z"):
        label_weights(labels, {"a": 1.0, "z": 1.0})


def test_several_labels_without_weights_do_not_load(attribute_reward_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="score_weights"):
        TransformersRewardEngine(
            TransformersRewardEngineConfig(model_dir=attribute_reward_model_dir)
        )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (ScoringRequest(()), "at least one message"),
        (ScoringRequest((ChatMessage("robot", "beep"),)), "role 'robot'"),
        (conversation("word " * 600), "longer than the reward model's 512"),
    ],
    ids=["empty", "unknown-role", "too-long"],
)
def test_bad_requests_are_refused(
    engine: TransformersRewardEngine, request_: ScoringRequest, message: str
) -> None:
    with pytest.raises(EngineRequestError, match=message):
        engine.check(request_)
    with pytest.raises(EngineRequestError, match=message):
        engine.score([request_])
