"""The six filters against expectations worked out by hand (numbers in the comments)."""

from __future__ import annotations

import math
import random

import pytest

from jobs.sdg.config import FilteringFunction, FilterSettings, SyntheticDataSettings
from jobs.sdg.filters import filter_seed, keep, prompt_rng, sigmoid, softmax, top_p_count

# softmax at temperature 1 of ln 1, ln 2, ln 3, ln 4 is 1/10, 2/10, 3/10, 4/10.
TENTHS = [math.log(1), math.log(2), math.log(3), math.log(4)]


def _keep(
    function: FilteringFunction,
    scores: list[float],
    seed: int = 0,
    index: int = 0,
    **settings: object,
) -> list[bool]:
    return keep(
        function, scores, FilterSettings.model_validate(settings), seed=seed, prompt_index=index
    )


def test_none_keeps_everything() -> None:
    assert _keep("none", [3.0, -1.0, 0.0]) == [True, True, True]


def test_top_k_keeps_the_best_with_ties_to_the_earlier() -> None:
    assert _keep("top_k", [0.1, 0.9, 0.5, 0.7], top_k=2) == [False, True, False, True]
    assert _keep("top_k", [0.5, 0.9, 0.5, 0.5], top_k=2) == [True, True, False, False]
    assert _keep("top_k", [2.0, 2.0, 2.0], top_k=1) == [True, False, False]
    assert _keep("top_k", [0.3, 0.1], top_k=5) == [True, True]  # top_k > k: all of them


def test_softmax_masses() -> None:
    assert softmax(TENTHS, 1.0) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # Temperature 2 halves the scores: e^0 : e^(ln 2) = 1 : 2.
    assert softmax([0.0, 2 * math.log(2)], 2.0) == pytest.approx([1 / 3, 2 / 3])
    # Shifted by the largest score: no overflow at scores far beyond exp's range.
    assert softmax([1000.0, 1000.0], 1.0) == [0.5, 0.5]


def test_top_p_keeps_the_best_until_their_mass_reaches_p() -> None:
    # Ranked: 0.4 (j=3), 0.3 (j=2), 0.2 (j=1), 0.1 (j=0).
    assert _keep("top_p", TENTHS, top_p=0.39) == [False, False, False, True]
    assert _keep("top_p", TENTHS, top_p=0.4) == [False, False, False, True]
    # 0.4 + 0.3 reaches 0.7 exactly on paper: the float tolerance stops there.
    assert _keep("top_p", TENTHS, top_p=0.7) == [False, False, True, True]
    assert _keep("top_p", TENTHS, top_p=0.71) == [False, True, True, True]
    assert _keep("top_p", TENTHS, top_p=1.0) == [True, True, True, True]
    # At temperature 2 the masses are 1/3, 2/3: 0.6 needs only the best, 0.7 both.
    scores = [0.0, 2 * math.log(2)]
    assert _keep("top_p", scores, top_p=0.6, softmax_temperature=2.0) == [False, True]
    assert _keep("top_p", scores, top_p=0.7, softmax_temperature=2.0) == [True, True]


def test_top_p_with_equal_scores_keeps_the_earlier_ones() -> None:
    # Thirds: 1/3 < 0.5 <= 2/3, so two, the first two.
    assert _keep("top_p", [1.0, 1.0, 1.0], top_p=0.5) == [True, True, False]
    assert top_p_count([5.0], 0.01, 1.0) == 1


def test_top_p_keeps_at_least_one() -> None:
    # One score dominates (mass ~1): it alone reaches any top_p.
    assert _keep("top_p", [100.0, 0.0, 0.0], top_p=1.0, softmax_temperature=1.0) == [
        True,
        False,
        False,
    ]
    assert _keep("top_p", [0.0, 0.0], top_p=0.000001) == [True, False]


def test_top_k_top_p_keeps_what_both_keep() -> None:
    # top_p 0.71 keeps 3, top_k 2: min is 2.
    assert _keep("top_k_top_p", TENTHS, top_k=2, top_p=0.71) == [False, False, True, True]
    # top_p 0.4 keeps 1, top_k 3: min is 1.
    assert _keep("top_k_top_p", TENTHS, top_k=3, top_p=0.4) == [False, False, False, True]
    assert _keep("top_k_top_p", [0.2], top_k=4, top_p=0.9) == [True]


def test_the_prompt_rng_is_a_stable_function_of_seed_and_index() -> None:
    # Python seeds Random from a string's SHA-512: the same in every process and release.
    rng = prompt_rng(7, 3)
    assert [round(rng.random(), 6) for _ in range(4)] == [0.774361, 0.136199, 0.040074, 0.184057]
    assert prompt_rng(7, 3).random() == random.Random("7:3").random()
    assert prompt_rng(7, 3).random() != prompt_rng(7, 4).random()
    assert prompt_rng(3, 7).random() != prompt_rng(7, 3).random()


def test_random_keeps_a_seeded_sample_of_the_asked_size() -> None:
    # ceil(0.5 x 4) = 2; Random("7:3").sample(range(4), 2) == [2, 0].
    assert random.Random("7:3").sample(range(4), 2) == [2, 0]
    assert _keep("random", [0.0] * 4, seed=7, index=3) == [True, False, True, False]
    # Another prompt, another draw: Random("7:4").sample(range(4), 2) == [3, 0].
    assert _keep("random", [0.0] * 4, seed=7, index=4) == [True, False, False, True]
    # keep_count wins over keep_fraction: Random("0:0").sample(range(5), 3) == [4, 0, 1].
    assert _keep("random", [0.0] * 5, keep_count=3, keep_fraction=0.2) == [
        True,
        True,
        False,
        False,
        True,
    ]
    # ceil(0.3 x 4) = 2 (not round: 1.2 -> 2).
    assert sum(_keep("random", [0.0] * 4, keep_fraction=0.3)) == 2


def test_random_edges() -> None:
    assert _keep("random", [0.0, 1.0], keep_count=5) == [True, True]  # keep_count > k
    assert _keep("random", [0.0], keep_fraction=0.1) == [True]  # ceil(0.1) = 1
    assert _keep("random", [1.0, 2.0, 3.0], keep_fraction=1.0) == [True, True, True]


def test_sigmoid_probabilities_and_their_draws() -> None:
    assert [sigmoid(x) for x in (-2.0, -1.0, 0.0, 1.0, 3.0, -3.0)] == pytest.approx(
        [0.119203, 0.268941, 0.5, 0.731059, 0.952574, 0.047426], abs=1e-6
    )
    # Draws of Random("7:3"): 0.774361, 0.136199, 0.040074, 0.184057.
    # Scores 3, -1, 0, -3 at threshold 0, temperature 1: p = 0.9526, 0.2689, 0.5, 0.0474;
    # kept where the draw is below p: T, T, T, F.
    assert _keep("sigmoid", [3.0, -1.0, 0.0, -3.0], seed=7, index=3) == [True, True, True, False]
    # Scores -1, 0, 1, 2 at threshold 1: x = -2, -1, 0, 1, p = 0.1192, 0.2689, 0.5, 0.7311;
    # the first draw 0.774 is above 0.119: F, T, T, T.
    assert _keep("sigmoid", [-1.0, 0.0, 1.0, 2.0], seed=7, index=3, threshold=1.0) == [
        False,
        True,
        True,
        True,
    ]
    # Temperature 4 flattens x = (3, -1, 0, -3) / 4 to p = 0.6792, 0.4378, 0.5, 0.3208:
    # draws 0.774 > 0.679 and 0.184 < 0.321 flip the ends: F, T, T, T.
    assert _keep("sigmoid", [3.0, -1.0, 0.0, -3.0], seed=7, index=3, sigmoid_temperature=4.0) == [
        False,
        True,
        True,
        True,
    ]


def test_sigmoid_may_keep_none_and_does_not_overflow() -> None:
    assert _keep("sigmoid", [0.0, 1.0, 2.0], threshold=1e9) == [False, False, False]
    assert _keep("sigmoid", [0.0, 1.0], threshold=-1e9) == [True, True]


@pytest.mark.parametrize("function", ["none", "random", "top_k", "top_p", "top_k_top_p", "sigmoid"])
def test_one_candidate_and_none(function: FilteringFunction) -> None:
    assert _keep(function, []) == []
    kept = _keep(function, [0.5], threshold=-10.0)
    assert kept == [True]


def test_filter_seed_falls_back_to_the_generation_seed() -> None:
    settings = SyntheticDataSettings.model_validate({"generation": {"seed": 11}})
    assert filter_seed(settings) == 11
    own = settings.model_copy(update={"filter": FilterSettings(seed=3)})
    assert filter_seed(own) == 3
