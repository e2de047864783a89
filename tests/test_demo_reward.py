"""The demo reward model: built on disk from the demo policy, deterministic, loaded back
through `from_pretrained`, and scoring replies as its rule (`letter_share`) does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from corral.demo_model import MARKER_FILE
from corral.demo_reward import (
    DemoRewardSpec,
    build_demo_reward_model,
    letter_share,
    load_demo_reward_model,
    score_replies,
)
from tests.sdg_loop import HELD_OUT_PROMPTS, sample_replies

# Measured on the default spec: Spearman 0.53 on policy samples of held-out prompts (whose
# letter shares spread little, std 0.06), 0.85 on replies that spread over [0, 1].
POLICY_SPEARMAN_FLOOR = 0.35


@pytest.fixture(scope="module")
def loaded(demo_reward_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_demo_reward_model(demo_reward_model_dir)


def _scores(
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase], prompt: str, replies: list[str]
) -> list[float]:
    model, tokenizer = loaded
    conversations = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        for reply in replies
    ]
    return score_replies(model, tokenizer, conversations)


def _spearman(a: list[float], b: list[float]) -> float:
    ranks = [torch.tensor(values).argsort().argsort().double() for values in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def test_letter_share_is_the_share_of_visible_characters_that_are_letters() -> None:
    assert letter_share("Paris is big.") == pytest.approx(10 / 11)
    assert letter_share("%% 12 !?") == 0.0
    assert letter_share("  \n ") == 0.0
    assert letter_share("abc") == 1.0


def test_it_is_a_one_label_classifier_sharing_the_policy_tokenizer(
    demo_reward_model_dir: Path,
    demo_model_dir: Path,
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = loaded
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (demo_reward_model_dir / name).read_bytes() == (demo_model_dir / name).read_bytes()
    marker = json.loads((demo_reward_model_dir / MARKER_FILE).read_text())
    assert marker["kind"] == "reward" and marker["rule"] == "letter_share"


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ("The capital of France is Paris.", "?? 12 ## !! 7,, ;;"),
        ("Corral trains models on Ray.", "Corral trains models on Ray!!! 123 456 ???"),
        ("the cat reads a letter", "th3 c4t r34ds 4 l3tt3r"),
        ("Seven days.", "7 days."),
    ],
)
def test_it_prefers_the_reply_with_more_letters(
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase], better: str, worse: str
) -> None:
    assert letter_share(better) > letter_share(worse)
    high, low = _scores(loaded, "Tell me something.", [better, worse])
    assert high > low


def test_its_scores_follow_the_rule_on_the_policys_own_replies(
    demo_model_dir: Path, loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase]
) -> None:
    replies = sample_replies(
        demo_model_dir, HELD_OUT_PROMPTS, seeds=range(16), max_tokens=24, temperature=1.0
    )
    scores, rule = [], []
    for prompt, row in zip(HELD_OUT_PROMPTS, replies, strict=True):
        scores += _scores(loaded, prompt, row)
        rule += [letter_share(reply) for reply in row]
    assert _spearman(scores, rule) >= POLICY_SPEARMAN_FLOOR
    mean_error = sum(abs(s - r) for s, r in zip(scores, rule, strict=True)) / len(rule)
    assert mean_error < 0.1  # scores are letter shares, not just in the same order


def test_a_build_is_deterministic_and_kept(tmp_path: Path, demo_model_dir: Path) -> None:
    spec = DemoRewardSpec(policy_samples_per_prompt=2, mixed_samples=32, steps=5)
    first = build_demo_reward_model(tmp_path / "a", policy_dir=demo_model_dir, spec=spec)
    second = build_demo_reward_model(tmp_path / "b", policy_dir=demo_model_dir, spec=spec)
    weights = "model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    built_at = (first / weights).stat().st_mtime_ns
    assert build_demo_reward_model(first, policy_dir=demo_model_dir, spec=spec) == first
    assert (first / weights).stat().st_mtime_ns == built_at  # kept, not rebuilt
    other = DemoRewardSpec(policy_samples_per_prompt=2, mixed_samples=32, steps=6)
    build_demo_reward_model(first, policy_dir=demo_model_dir, spec=other)
    assert (first / weights).read_bytes() != (second / weights).read_bytes()  # rebuilt


def test_a_foreign_directory_is_refused(tmp_path: Path, demo_model_dir: Path) -> None:
    (tmp_path / "mine.txt").write_text("not a model")
    with pytest.raises(ValueError, match="refusing"):
        build_demo_reward_model(tmp_path, policy_dir=demo_model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
