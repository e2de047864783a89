"""The synthetic-data loop on the demo models, in-process: sample k replies per prompt from
the policy, score them with the demo reward model, keep (best, worst) as a DPO pair, train
DPO, and compare the policy's mean reward on held-out prompts before and after.

Sampling goes through the same engine the LLM Serve app runs (`TransformersEngine`, one
seeded request per reply), scoring through `AutoModelForSequenceClassification` on the
chat template's rendering, as the reward Serve app does; `dpo_pairs` filters as the
generation job's "best vs worst" DPO output does. So the figures below hold for the chain
through the API (generation job -> dataset -> `/post_training/preference_optimize`) with
the settings in `CHAIN`.

Measured with `CHAIN` (24 prompts x 8 candidates at temperature 1, 24 tokens; 24 pairs;
DPO beta 0.1, AdamW lr 1e-2 -> 1e-3 cosine, 6 epochs of 2 pairs x 2 workers = 36 steps),
the policy's mean reward on HELD_OUT_PROMPTS x HELD_OUT_SEEDS (the rule's letter share in
brackets), candidates seeded 100-107 (GENERATION_SEEDS), then 200-207, ... 500-507:

    before  0.763 (0.784)
    after   0.940 (0.917)  0.973 (0.944)  0.933 (0.914)  0.971 (0.940)  0.920 (0.908)
    rise   +0.176         +0.210         +0.170         +0.208         +0.157

and with candidates 100-107 but three other DPO shuffles: +0.167, +0.171, +0.192. The DPO
in those runs was jobs/dpo.py's own loss, log-probs, pair batching, optimizer and schedule
on one process with 4 pairs per step (what 2 workers of 2 pairs each average to), 3-8 s.
What matters: lr (the demo policy is random; at lr 5e-3 nothing moved, +0.007), epochs
(4 epochs rose +0.08 to +0.17, less steadily) and candidates (k = 4: +0.13 and +0.09).
`SAFE_MARGIN` is half of the smallest rise measured.
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
# The candidates' seeds: candidate i of every prompt is sampled with seed 100 + i.
GENERATION_SEEDS: Final = tuple(range(100, 108))


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
    candidates=len(GENERATION_SEEDS),
    max_tokens=24,
    temperature=1.0,
    lr=1e-2,
    lr_min=1e-3,
    n_epochs=6,
    batch_size=2,
    beta=0.1,
)
# The rise of the mean held-out reward a test may assert after one round of the chain.
SAFE_MARGIN: Final = 0.08


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


def score(
    reward_dir: Path, prompts: Sequence[str], replies: Sequence[Sequence[str]]
) -> list[list[float]]:
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
