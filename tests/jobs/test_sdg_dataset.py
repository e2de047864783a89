"""A generation job's rows and shards (jobs/sdg/dataset.py), from hand-made outcomes."""

from __future__ import annotations

from jobs.rows import preference_row_problem, sft_row_problem
from jobs.sdg.config import DatasetOutput, PromptInput, PromptTurn
from jobs.sdg.dataset import (
    SavedCandidate,
    SavedOutcome,
    dataset_rows,
    decode_shard,
    encode_shard,
    shard_name,
)


def prompt(index: int, *turns: tuple[str, str]) -> PromptInput:
    messages = turns or (("user", f"question {index}"),)
    return PromptInput(
        index=index,
        generation_prompt=f"<prompt {index}>",
        messages=tuple(PromptTurn(role=role, content=text) for role, text in messages),  # type: ignore[arg-type]
    )


def outcome(index: int, *candidates: tuple[str, float, bool]) -> SavedOutcome:
    return SavedOutcome(
        index=index,
        candidates=tuple(
            SavedCandidate(text, score, kept, "stop") for text, score, kept in candidates
        ),
    )


def test_sft_rows_hold_the_best_kept_candidate_after_the_prompt() -> None:
    prompts = [prompt(0, ("system", "be brief"), ("user", "hi")), prompt(1), prompt(2)]
    outcomes = [
        # the best overall (9.0) was filtered out: the best *kept* one is the reply
        outcome(0, ("a", 1.0, True), ("b", 9.0, False), ("c", 3.0, True), ("d", 3.0, True)),
        outcome(2, ("x", 0.5, True)),
        outcome(1, ("y", 2.0, False)),  # nothing kept: no row
    ]
    made = dataset_rows(outcomes, prompts, DatasetOutput(format="sft"))
    assert made.rows == [
        {
            "dialog": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "c"},  # 3.0 tie: the earlier one
            ]
        },
        {
            "dialog": [
                {"role": "user", "content": "question 2"},
                {"role": "assistant", "content": "x"},
            ]
        },
    ]
    assert made.dropped == {"no kept candidate": 1, "margin": 0, "refused": 0}
    assert all(sft_row_problem(row) is None for row in made.rows)


def test_dpo_pairs_the_best_kept_with_the_lowest_and_drops_ties_and_small_margins() -> None:
    prompts = [prompt(i) for i in range(6)]
    outcomes = [
        outcome(0, ("low", -2.0, False), ("best", 1.5, True), ("mid", 0.0, True)),
        outcome(1, ("same", 1.0, True), ("tie", 1.0, True)),  # a tie: no row
        outcome(2, ("a", 1.0, True), ("b", 0.7, True)),  # margin 0.3 <= 0.5: no row
        outcome(3, ("a", 1.0, True), ("b", 0.4, False), ("c", 0.4, True)),  # 0.6 > 0.5
        outcome(4, ("only", 1.0, True)),  # one candidate: best == lowest
        outcome(5, ("dup", 2.0, True), ("dup", -1.0, False)),  # equal texts teach nothing
    ]
    made = dataset_rows(outcomes, prompts, DatasetOutput(format="dpo", min_margin=0.5))
    question = [{"role": "user", "content": "question 0"}]
    assert made.rows == [
        {"prompt": question, "chosen": "best", "rejected": "low"},
        # lowest-score tie (b, c at 0.4): the later candidate is the rejected one
        {"prompt": [{"role": "user", "content": "question 3"}], "chosen": "a", "rejected": "c"},
    ]
    assert made.dropped == {"no kept candidate": 0, "margin": 4, "refused": 0}
    assert all(preference_row_problem(row) is None for row in made.rows)


def test_a_zero_margin_still_drops_ties() -> None:
    made = dataset_rows(
        [
            outcome(0, ("a", 1.0, True), ("b", 1.0, True)),
            outcome(1, ("a", 1.0, True), ("b", 0.9, True)),
        ],
        [prompt(0), prompt(1)],
        DatasetOutput(format="dpo", min_margin=0.0),
    )
    assert [row["chosen"] for row in made.rows] == ["a"]
    assert made.dropped["margin"] == 1


def test_rows_the_recipes_would_refuse_are_dropped_and_counted() -> None:
    prompts = [prompt(0, ("user", "q"), ("assistant", "half an answer")), prompt(1), prompt(2)]
    outcomes = [
        outcome(0, ("good", 1.0, True), ("bad", 0.0, True)),  # DPO prompts end with the user
        outcome(1, ("   ", 1.0, True), ("bad", 0.0, True)),  # an empty chosen reply
        outcome(2, ("good", 1.0, True), ("bad", 0.0, True)),
    ]
    made = dataset_rows(outcomes, prompts, DatasetOutput(format="dpo"))
    assert [row["prompt"][-1]["content"] for row in made.rows] == ["question 2"]
    assert made.dropped == {"no kept candidate": 0, "margin": 0, "refused": 2}
    sft = dataset_rows(outcomes[1:], prompts, DatasetOutput(format="sft"))
    assert sft.dropped["refused"] == 1 and len(sft.rows) == 1


def test_a_shard_round_trips_in_index_order() -> None:
    batch = [outcome(7, ("é ✓", 0.25, True), ("b", -1.0, False)), outcome(3, ("c", 2.0, True))]
    assert decode_shard(encode_shard(batch)) == sorted(batch, key=lambda o: o.index)


def test_shard_names_say_the_range_and_differ_for_interleaved_batches() -> None:
    evens = [outcome(i, ("t", 0.0, True)) for i in (0, 2, 4)]
    odds_and_ends = [outcome(i, ("t", 0.0, True)) for i in (0, 3, 4)]
    assert shard_name(evens).startswith("0-4-") and shard_name(evens).endswith(".jsonl")
    assert shard_name(evens) != shard_name(odds_and_ends)
    assert shard_name(evens) == shard_name(list(reversed(evens)))
