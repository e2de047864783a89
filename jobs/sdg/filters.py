"""The six filtering functions of `/synthetic_data_generation/generate`, in pure Python.

Each acts on one prompt's k scored candidates (in generation order) and says which to
keep. The API process imports this module (it validates nothing here, but the service
and the job share it), so it needs neither numpy nor Ray.

Details the contract (`jobs/sdg/config.py`) leaves open, fixed here:

- Ranking ("the best"): by score, highest first; equal scores rank in generation order
  (the earlier candidate first), so a tie at a cut keeps the earlier one only.
- `top_p`: the softmax is taken of score / `softmax_temperature`, shifted by the largest
  score so that no score overflows. Walking the ranking, a candidate is kept while the mass
  kept before it is still short of `top_p`; "reaches" allows a relative float tolerance
  of 1e-9, so masses that sum to `top_p` exactly on paper (0.4 + 0.3 for top_p=0.7) stop
  there rather than taking one more for a rounding error.
- `random`: keeps min(n, k) candidates, n = `keep_count` if given, else
  ceil(`keep_fraction` x k) (at least one, as keep_fraction > 0); the chosen ones are
  `rng.sample(range(k), n)`.
- `sigmoid`: one draw `u = rng.random()` per candidate, in generation order; the candidate
  is kept when u < sigma((score - `threshold`) / `sigmoid_temperature`).
- The per-prompt RNG is `random.Random(f"{seed}:{prompt_index}")`: Python seeds it from
  the string's SHA-512 (never the salted `hash()`), so it is the same in every process and
  on every run, and it does not depend on which batch the prompt travelled in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from jobs.sdg.config import FilteringFunction, FilterSettings, SyntheticDataSettings

TOP_P_TOLERANCE = 1e-9


def filter_seed(settings: SyntheticDataSettings) -> int:
    """The seed of the random filters: the filter's own, else the generation's."""
    own = settings.filter.seed
    return settings.generation.seed if own is None else own


def prompt_rng(seed: int, prompt_index: int) -> random.Random:
    """The random source of one prompt's filter (see the module doc)."""
    return random.Random(f"{seed}:{prompt_index}")  # noqa: S311 (sampling, not secrets)


def ranking(scores: Sequence[float]) -> list[int]:
    """Candidate indices, best first; equal scores in generation order."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def softmax(scores: Sequence[float], temperature: float) -> list[float]:
    """softmax(score / temperature), computed shifted by the largest score."""
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    total = math.fsum(weights)
    return [w / total for w in weights]


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def top_p_count(scores: Sequence[float], top_p: float, temperature: float) -> int:
    """How many of the best candidates it takes for their softmax mass to reach `top_p`
    (at least one)."""
    mass = softmax(scores, temperature)
    target = top_p * (1.0 - TOP_P_TOLERANCE)
    kept = 0.0
    count = 0
    for j in ranking(scores):
        if count > 0 and kept >= target:
            break
        kept += mass[j]
        count += 1
    return count


def random_count(k: int, settings: FilterSettings) -> int:
    """How many candidates `random` keeps out of k."""
    wanted = settings.keep_count
    if wanted is None:
        wanted = math.ceil(settings.keep_fraction * k)
    return min(wanted, k)


def keep(
    function: FilteringFunction,
    scores: Sequence[float],
    settings: FilterSettings,
    *,
    seed: int,
    prompt_index: int,
) -> list[bool]:
    """Which of one prompt's candidates `function` keeps, one flag per score (in
    generation order). `seed` seeds the random filters (`filter_seed`)."""
    k = len(scores)
    if k == 0:
        return []
    if function == "none":
        return [True] * k
    if function == "random":
        chosen = set(prompt_rng(seed, prompt_index).sample(range(k), random_count(k, settings)))
        return [j in chosen for j in range(k)]
    if function == "sigmoid":
        rng = prompt_rng(seed, prompt_index)
        return [
            rng.random() < sigmoid((s - settings.threshold) / settings.sigmoid_temperature)
            for s in scores
        ]
    if function == "top_k":
        count = min(settings.top_k, k)
    elif function == "top_p":
        count = top_p_count(scores, settings.top_p, settings.softmax_temperature)
    elif function == "top_k_top_p":
        count = min(
            settings.top_k, top_p_count(scores, settings.top_p, settings.softmax_temperature)
        )
    else:
        raise ValueError(f"unknown filtering function {function!r}")
    best = set(ranking(scores)[:count])
    return [j in best for j in range(k)]
