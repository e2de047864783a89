"""One round of the synthetic-data loop on the demo models, in-process (tests/sdg_loop.py):
best-vs-worst DPO pairs from the policy's own scored replies raise its mean reward on
held-out prompts by at least the margin the chain's test asserts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sdg_loop import (
    CHAIN,
    GENERATION_SEEDS,
    HELD_OUT_PROMPTS,
    HELD_OUT_SEEDS,
    SAFE_MARGIN,
    TRAINING_PROMPTS,
    dpo_in_process,
    dpo_pairs,
    mean_reward,
    sample_replies,
    score,
)

pytestmark = pytest.mark.slow


def test_one_round_raises_the_mean_reward(
    demo_model_dir: Path, demo_reward_model_dir: Path, tmp_path: Path
) -> None:
    sampling = {"max_tokens": CHAIN.max_tokens, "temperature": CHAIN.temperature}
    replies = sample_replies(demo_model_dir, TRAINING_PROMPTS, seeds=GENERATION_SEEDS, **sampling)
    rows = dpo_pairs(
        TRAINING_PROMPTS, replies, score(demo_reward_model_dir, TRAINING_PROMPTS, replies)
    )
    assert len(rows) == len(TRAINING_PROMPTS)  # 8 sampled replies never all tie
    tuned = dpo_in_process(demo_model_dir, rows, tmp_path / "tuned", settings=CHAIN)

    def held_out(policy: Path) -> float:
        return mean_reward(
            policy, demo_reward_model_dir, HELD_OUT_PROMPTS, seeds=HELD_OUT_SEEDS, **sampling
        )

    before, after = held_out(demo_model_dir), held_out(tuned)
    assert after - before >= SAFE_MARGIN, (before, after)
