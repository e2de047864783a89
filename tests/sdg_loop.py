"""The synthetic-data loop on the demo models, in-process: sample k replies per prompt from
the policy, score them with the demo reward model, keep (best, worst) as a DPO pair, train
DPO, and compare the policy's mean reward on held-out prompts before and after.

Sampling goes through the same engine the LLM Serve app runs (`TransformersEngine`, one
seeded request per reply), scoring through `AutoModelForSequenceClassification` on the
chat template's rendering, as the reward Serve app does; `dpo_pairs` filters as the
generation job's "best vs worst" DPO output does. So the figures below hold for the chain
through the API (generation job -> dataset -> `/post_training/preference_optimize`) with
the settings in `CHAIN`.

Measured (see `CHAIN` for the settings; FIGURES_PENDING is replaced by the measurement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from corral.demo_reward import load_demo_reward_model, score_replies
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
from serve_apps.engines.transformers_engine import TransformersEngine, TransformersEngineConfig

# Prompts the generation job asks (not the reward model's training prompts).
TRAINING_PROMPTS: Final = (
    "Who are you?",
    "What is Ray?",
    "Name a fruit.",
    "How old is the sun?",
    "Describe a rainy day.",
    "What is a good breakfast?",
    "Tell me about dogs.",
    "What should I read next?",
    "How do trains work?",
    "Give me a tip for cooking.",
    "What is your favourite colour?",
    "Why do birds sing?",
    "What is a river?",
    "How do I make tea?",
    "What is the moon made of?",
    "Tell me about cats.",
    "What is a computer?",
    "How do I plant a tree?",
    "What makes a good friend?",
    "Why is the sea salty?",
    "What is a song?",
    "How do bees make honey?",
    "What is a city?",
    "Tell me about winter.",
)
# Held-out prompts the before/after comparison asks, one reply per seed.
HELD_OUT_PROMPTS: Final = (
    "What is the weather like?",
    "Write a line about the sea.",
    "How do plants grow?",
    "What is music?",
    "Tell me a story.",
    "Where do you live?",
)
HELD_OUT_SEEDS: Final = tuple(range(4))


@dataclass(frozen=True)
class ChainSettings:
    """What a generation job and the DPO job after it are asked for."""

    candidates: int  # k replies per prompt
    max_tokens: int
    temperature: float
    lr: float
    lr_min: float
    n_epochs: int
    batch_size: int  # pairs per worker per step (the chain runs 2 workers)
    beta: float  # DPO's reward_scale
    workers: int = 2


CHAIN: Final = ChainSettings(
    candidates=4,
    max_tokens=24,
    temperature=1.0,
    lr=1e-3,
    lr_min=1e-4,
    n_epochs=4,
    batch_size=2,
    beta=0.1,
)
# The smallest rise of the mean held-out reward a test may assert after one round.
SAFE_MARGIN: Final = 0.0


def sampling(seed: int, *, max_tokens: int, temperature: float) -> SamplingOptions:
    """Plain temperature sampling (no top-k, no top-p cut), seeded per reply."""
    return SamplingOptions(
        max_tokens=max_tokens, strategy="top_p", temperature=temperature, top_p=1.0, seed=seed
    )


def sample_replies(
    policy_dir: Path,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    max_tokens: int,
    temperature: float,
) -> list[list[str]]:
    """For each prompt, one reply per seed, sampled by the serving engine."""
    engine = TransformersEngine(TransformersEngineConfig(model_dir=policy_dir, device="cpu"))
    tokenizer = engine._tokenizer
    requests = [
        GenerationRequest(
            prompt=tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            ),
            sampling=sampling(seed, max_tokens=max_tokens, temperature=temperature),
        )
        for prompt in prompts
        for seed in seeds
    ]
    texts = [result.text for result in engine.generate(requests)]
    return [texts[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]


def score(reward_dir: Path, prompts: Sequence[str], replies: Sequence[Sequence[str]]) -> list[list[float]]:
    """The reward model's score of every reply, as a [user, assistant] conversation."""
    model, tokenizer = load_demo_reward_model(reward_dir)
    conversations = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        for prompt, row in zip(prompts, replies, strict=True)
        for reply in row
    ]
    flat = score_replies(model, tokenizer, conversations)
    width = len(replies[0]) if replies else 0
    return [flat[i * width : (i + 1) * width] for i in range(len(replies))]


def mean_reward(
    policy_dir: Path,
    reward_dir: Path,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    max_tokens: int,
    temperature: float,
) -> float:
    """The policy's mean reward over one sampled reply per prompt and seed."""
    replies = sample_replies(
        policy_dir, prompts, seeds=seeds, max_tokens=max_tokens, temperature=temperature
    )
    scores = score(reward_dir, prompts, replies)
    return float(torch.tensor(scores).mean())


def dpo_pairs(
    prompts: Sequence[str], replies: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]
) -> list[dict[str, Any]]:
    """One DPO row per prompt: the best-scored reply chosen, the worst rejected; a prompt
    whose best and worst tie gives no row."""
    rows = []
    for prompt, row, row_scores in zip(prompts, replies, scores, strict=True):
        best = max(range(len(row)), key=row_scores.__getitem__)
        worst = min(range(len(row)), key=row_scores.__getitem__)
        if row_scores[best] > row_scores[worst]:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": row[best],
                    "rejected": row[worst],
                }
            )
    return rows
