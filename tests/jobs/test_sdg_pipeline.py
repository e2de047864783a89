"""The synthetic data pipeline on a real local Ray cluster: the demo model on the real
transformers engine generates, a rule-scoring reward app (the reward app's `score`
method) scores, and Ray Data runs the stages."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from jobs.sdg.config import PipelineConfig, PromptInput, PromptTurn, SyntheticDataSettings
from jobs.sdg.filters import keep, ranking
from jobs.sdg.pipeline import (
    PromptOutcome,
    ScoredCandidate,
    StageFailed,
    candidate_seed,
    run_pipeline,
    stage_error,
    statistics,
    unexpected_failure,
)
from serve_apps.engines.protocol import (
    ChatMessage,
    GenerationRequest,
    SamplingOptions,
    ScoringRequest,
)
from serve_apps.llm import build_app
from serve_apps.reward import build_app as build_reward_app
from tests.jobs.rule_reward import build_rule_reward, rule_score

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LLM_APP = "llm-sdg-pipeline"
REWARD_APP = "reward-sdg-rule"
SLOW_REWARD_APP = "reward-sdg-rule-slow"
MODEL_REWARD_APP = "reward-sdg-model"
K = 3


@pytest.fixture(scope="module")
def apps(serve_instance: None, demo_model_dir: Path, reward_model_dir: Path) -> Iterator[None]:
    """The demo LLM, the rule reward apps and the real reward app on a tiny reward
    model, deployed once for the module."""
    llm = build_app(
        {
            "name": "sdg-pipeline",
            "model_dir": str(demo_model_dir),
            "cpus_per_replica": 0.5,
            "max_batch_size": 8,
        }
    )
    serve.run(llm, name=LLM_APP, route_prefix=None)
    serve.run(build_rule_reward(), name=REWARD_APP, route_prefix=None)
    serve.run(build_rule_reward(0.05), name=SLOW_REWARD_APP, route_prefix=None)
    reward = build_reward_app(
        {"name": "sdg-model", "model_dir": str(reward_model_dir), "cpus_per_replica": 0.25}
    )
    serve.run(reward, name=MODEL_REWARD_APP, route_prefix=None)
    yield
    for app in (LLM_APP, REWARD_APP, SLOW_REWARD_APP, MODEL_REWARD_APP):
        serve.delete(app)


def _prompt(index: int, text: str | None = None) -> PromptInput:
    content = text or f"Write about topic {index % 10}"
    return PromptInput(
        index=index,
        generation_prompt=(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            f"{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        messages=(PromptTurn(role="user", content=content),),
    )


def _config(**overrides: Any) -> PipelineConfig:
    settings = SyntheticDataSettings.model_validate(
        {
            "generation": {"num_candidates": K, "max_tokens": 6, "seed": 5},
            "filter": {"top_k": 1},
        }
    )
    base: dict[str, Any] = {
        "filtering_function": "top_k",
        "settings": settings,
        "generation_app": LLM_APP,
        "reward_app": REWARD_APP,
        "batch_size": 2,
    }
    return PipelineConfig.model_validate(base | overrides)


def _run(
    prompts: list[PromptInput], config: PipelineConfig
) -> tuple[list[list[PromptOutcome]], dict[str, float]]:
    run = run_pipeline(prompts, config)
    batches = list(run.batches())
    return batches, run.stage_seconds


def _by_index(batches: list[list[PromptOutcome]]) -> list[PromptOutcome]:
    return sorted((o for batch in batches for o in batch), key=lambda o: o.index)


def test_each_prompt_gets_k_scored_candidates_filtered_the_same_however_batched(
    apps: None,
) -> None:
    prompts = [_prompt(i) for i in range(6)]
    batches, seconds = _run(prompts, _config())
    assert len(batches) > 1  # streamed batch by batch, not one result at the end
    outcomes = _by_index(batches)
    assert [o.index for o in outcomes] == list(range(6))
    for outcome in outcomes:
        assert len(outcome.candidates) == K
        scores = [c.score for c in outcome.candidates]
        assert scores == [rule_score(c.text) for c in outcome.candidates]
        best = ranking(scores)[0]
        assert [c.kept for c in outcome.candidates] == [j == best for j in range(K)]
        assert all(c.stop_reason in {"end_of_turn", "out_of_tokens"} for c in outcome.candidates)
    # Sampled with different seeds, candidates differ.
    assert any(len({c.text for c in o.candidates}) > 1 for o in outcomes)
    assert all(seconds[stage] > 0 for stage in ("generate", "score", "filter"))

    # The same config again, batched differently: the same output.
    again, _ = _run(prompts, _config(batch_size=4))
    assert _by_index(again) == outcomes

    # Candidate j of prompt i was sampled with its own seed, whatever it was batched with.
    handle = serve.get_app_handle(LLM_APP)
    generation = _config().settings.generation
    for j, candidate in enumerate(outcomes[3].candidates):
        sampling = SamplingOptions(
            max_tokens=generation.max_tokens,
            strategy=generation.strategy,
            temperature=generation.temperature,
            top_p=generation.top_p,
            top_k=generation.top_k,
            seed=candidate_seed(generation.seed, 3, j),
        )
        alone = handle.generate.remote(GenerationRequest(prompts[3].generation_prompt, sampling))
        assert alone.result().text == candidate.text


def test_the_real_reward_app_scores_and_top_p_filters(apps: None) -> None:
    config = _config(reward_app=MODEL_REWARD_APP, filtering_function="top_p")
    prompts = [_prompt(i) for i in range(2)]
    outcomes = _by_index(_run(prompts, config)[0])
    reward = serve.get_app_handle(MODEL_REWARD_APP)
    for prompt, outcome in zip(prompts, outcomes, strict=True):
        turns = (ChatMessage("user", prompt.messages[0].content),)
        alone = [
            reward.score.remote(ScoringRequest((*turns, ChatMessage("assistant", c.text))))
            for c in outcome.candidates
        ]
        scores = [c.score for c in outcome.candidates]
        assert scores == pytest.approx([r.result() for r in alone], abs=1e-5)
        expected = keep("top_p", scores, config.settings.filter, seed=5, prompt_index=prompt.index)
        assert [c.kept for c in outcome.candidates] == expected


def test_no_more_than_max_in_flight_calls_per_app(apps: None) -> None:
    llm = serve.get_app_handle(LLM_APP)
    seen_before = len(llm.stats.remote().result()["batch_sizes"])
    config = _config(reward_app=SLOW_REWARD_APP, max_in_flight=2, batch_size=2)
    _run([_prompt(i) for i in range(4)], config)
    reward = serve.get_app_handle(SLOW_REWARD_APP).stats.remote().result()
    assert reward["calls"] == 4 * K
    # The bound is reached (calls do overlap) and never passed.
    assert reward["most_running"] == 2
    sizes = llm.stats.remote().result()["batch_sizes"][seen_before:]
    assert sum(sizes) == 4 * K and max(sizes) <= 2, sizes


@pytest.mark.parametrize(
    ("overrides", "stage", "app"),
    [
        ({"generation_app": "llm-absent"}, "generate", "llm-absent"),
        ({"reward_app": "reward-absent"}, "score", "reward-absent"),
    ],
)
def test_an_app_that_is_not_deployed_is_unavailable(
    apps: None, overrides: dict[str, str], stage: str, app: str
) -> None:
    with pytest.raises(StageFailed) as failed:
        list(run_pipeline([_prompt(0)], _config(**overrides)).batches())
    assert (failed.value.stage, failed.value.unavailable) == (stage, True)
    assert f"stage {stage!r}" in str(failed.value) and app in str(failed.value)


def test_a_failing_batch_fails_the_run_naming_its_stage(apps: None) -> None:
    prompts = [_prompt(i) for i in range(5)] + [_prompt(5, "please fail-score this")]
    run = run_pipeline(prompts, _config())
    yielded: list[list[PromptOutcome]] = []
    with pytest.raises(StageFailed) as failed:
        yielded.extend(run.batches())
    assert (failed.value.stage, failed.value.unavailable) == ("score", False)
    assert "RuntimeError" in str(failed.value) and REWARD_APP in str(failed.value)
    assert sum(len(batch) for batch in yielded) < len(prompts)  # never a silently short end


def test_what_a_call_fails_with_becomes_the_stage_failure(apps: None) -> None:
    refusal = ScoringRequest(messages=(ChatMessage("user", "refuse-score me"),) * 2)
    with pytest.raises(Exception) as raised:
        serve.get_app_handle(REWARD_APP).score.remote(refusal).result()
    refused = stage_error("score", REWARD_APP, raised.value)
    assert (refused.stage, refused.unavailable) == ("score", False)
    assert "refused a request: rule scorer refuses this conversation" in str(refused)
    # A stage's own bug reaches the driver as Ray Data's error, naming the operator.
    bug = unexpected_failure(RuntimeError("ray::MapWorker(MapBatches(Filter)).submit() ..."))
    assert bug is not None and (bug.stage, bug.unavailable) == ("filter", False)
    assert "RuntimeError" in str(bug)
    assert unexpected_failure(RuntimeError("a driver-side failure")) is None


def test_stage_failed_survives_pickling() -> None:
    import pickle

    error = StageFailed("score", "app 'x' is unavailable", unavailable=True)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.stage, copy.unavailable, str(copy)) == ("score", True, str(error))


def _candidate(score: float, kept: bool) -> ScoredCandidate:
    return ScoredCandidate(text=f"{score}", score=score, kept=kept, stop_reason="end_of_turn")


def test_statistics_by_hand() -> None:
    outcomes = [
        PromptOutcome(0, (_candidate(1.0, False), _candidate(3.0, True))),
        PromptOutcome(1, (_candidate(2.0, False), _candidate(5.0, True), _candidate(4.0, True))),
    ]
    figures = statistics(outcomes, {"generate": 2.0, "score": 1.0, "filter": 0.5}, wall_s=3.0)
    assert (figures["prompts"], figures["generated"], figures["kept"], figures["filtered"]) == (
        2,
        5,
        3,
        2,
    )
    # Sorted 1..5: p-th percentile at position 4p/100 (linear): p10 1.4, p25 2, p50 3,
    # p75 4, p90 4.6.
    assert figures["scores"] == pytest.approx(
        {"min": 1.0, "mean": 3.0, "max": 5.0, "p10": 1.4, "p25": 2.0, "p50": 3.0}
        | {"p75": 4.0, "p90": 4.6}
    )
    # Kept 3, 4, 5: position 2p/100: p10 3.2, p25 3.5, p50 4, p75 4.5, p90 4.8.
    assert figures["kept_scores"] == pytest.approx(
        {"min": 3.0, "mean": 4.0, "max": 5.0, "p10": 3.2, "p25": 3.5, "p50": 4.0}
        | {"p75": 4.5, "p90": 4.8}
    )
    assert figures["seconds"] == {"generate": 2.0, "score": 1.0, "filter": 0.5, "total": 3.0}
    empty = statistics([PromptOutcome(0, (_candidate(1.0, False),))], {}, wall_s=0.1)
    assert empty["kept_scores"] is None and empty["scores"]["p50"] == 1.0
    assert math.isclose(empty["seconds"]["generate"], 0.0)
