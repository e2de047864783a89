"""SyntheticDataService without Ray: a real resolver over a real SQLite store (file models
and a tenant's registered model), Serve's app states as the test sets them (`AppStates`),
a real JobsService with a launcher that records (`JobLauncher`). What is checked before
any model is called, the size caps, and job submission. The pipeline runs for real in
tests/api/test_synthetic_data_api.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from corral.api.common import Message
from corral.api.synthetic_data_generation import (
    SyntheticDataGenerationRequest,
    SyntheticDataJobRequest,
)
from corral.errors import (
    Conflict,
    CorralError,
    InvalidRequest,
    PipelineFailed,
    http_status_for,
    retry_after_s,
)
from corral.llama3 import format_chat
from corral.ray_jobs import RayJobInfo
from corral.services.jobs import JobsService
from corral.services.synthetic_data import (
    JOB_ROUTE,
    SyntheticDataLimits,
    SyntheticDataService,
)
from corral.serving.catalog import ModelSpec, file_app_name, tenant_app_name
from corral.serving.deployer import AppState, ModelUnavailable, ServeDeployer
from corral.serving.resolver import ModelResolver
from corral.storage import Storage
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStore
from corral.tenancy import job_key
from jobs.sdg.config import PipelineConfig, PromptInput, PromptTurn, SyntheticDataJobConfig
from jobs.sdg.pipeline import PipelineRun, PromptOutcome, ScoredCandidate, StageFailed
from tests.conftest import add_registered_model_row

RUNNING = AppState(status="RUNNING", message="", running_replicas=1)
GENERATOR = file_app_name("demo")
REWARD = file_app_name("demo-reward")


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "tool_calls": [], "tool_responses": []}


def request(**fields: Any) -> SyntheticDataGenerationRequest:
    body: dict[str, Any] = {"prompts": [user("Name a colour.")], "filtering_function": "top_k"}
    return SyntheticDataGenerationRequest.model_validate(body | fields)


def job_request(**fields: Any) -> SyntheticDataJobRequest:
    body: dict[str, Any] = {
        "job_uuid": "sdg-1",
        "prompts": [user("Name a colour."), user("Name a fruit.")],
        "filtering_function": "top_k",
    }
    return SyntheticDataJobRequest.model_validate(body | fields)


class Apps:
    """Serve's app states, as the test sets them (every app running unless told)."""

    def __init__(self) -> None:
        self.states: dict[str, AppState] = {}

    def status(self, app_name: str) -> AppState:
        return self.states.get(app_name, RUNNING)


class RecordingLauncher:
    """A `JobLauncher` that remembers submissions instead of running them."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        self.submitted.append(job_key)
        return True

    def info(self, job_key: str) -> RayJobInfo | None:
        return None

    def stop(self, job_key: str) -> bool:
        return False


def no_pipeline(prompts: Sequence[PromptInput], config: PipelineConfig) -> Any:
    raise AssertionError("the pipeline must not run")


@pytest.fixture
def apps() -> Apps:
    return Apps()


@pytest.fixture
def launcher() -> RecordingLauncher:
    return RecordingLauncher()


@pytest.fixture
def service(
    sqlite_database: Database, tmp_path: Path, apps: Apps, launcher: RecordingLauncher
) -> Iterator[SyntheticDataService]:
    weights = tmp_path / "weights"
    weights.mkdir()
    resolver = ModelResolver(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[
            ModelSpec(name="demo", aliases=["llama3_8b_chat"], checkpoint_dir=weights),
            ModelSpec(
                name="demo-reward",
                kind="reward",
                aliases=["llama3_405b_reward"],
                checkpoint_dir=weights,
            ),
        ],
    )
    storage = Storage(str(tmp_path / "checkpoints"))
    yield SyntheticDataService(
        models=resolver,
        apps=apps,
        jobs=JobsService(database=sqlite_database, launcher=launcher, storage=storage),
        storage=storage,
        limits=SyntheticDataLimits(max_sync_generations=8, max_job_prompts=3, batch_size=2),
        runner=no_pipeline,
    )


# ---------------------------------------------------------------- prepare


def test_a_prompt_becomes_the_generators_llama3_prompt_and_the_reward_models_turns(
    service: SyntheticDataService,
) -> None:
    run = service.prepare(tenant="alpha", request=request(reward_scoring=None))
    message = Message.model_validate(user("Name a colour."))
    assert run.prompts == (
        PromptInput(
            index=0,
            generation_prompt=format_chat([message]),
            messages=(PromptTurn(role="user", content="Name a colour."),),
        ),
    )
    assert run.prompts[0].generation_prompt.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert run.config.filtering_function == "top_k"
    assert (run.config.generation_app, run.config.reward_app) == (GENERATOR, REWARD)
    assert (run.config.batch_size, run.config.max_in_flight) == (2, 16)
    assert run.config.settings.generation.num_candidates == 4  # the defaults


def test_reward_scoring_carries_the_settings(service: SyntheticDataService) -> None:
    scoring = {"generation": {"num_candidates": 2, "seed": 7}, "filter": {"top_k": 2}}
    run = service.prepare(tenant="alpha", request=request(reward_scoring=scoring))
    assert run.config.settings.generation.num_candidates == 2
    assert run.config.settings.generation.seed == 7
    assert run.config.settings.filter.top_k == 2


def test_a_tenants_registered_model_wins_for_that_tenant_only(
    service: SyntheticDataService, sqlite_database: Database, tmp_path: Path
) -> None:
    add_registered_model_row(
        sqlite_database, tenant="alpha", name="llama3_8b_chat", checkpoint_dir=tmp_path
    )
    alpha = service.prepare(tenant="alpha", request=request())
    beta = service.prepare(tenant="beta", request=request())
    assert alpha.config.generation_app == tenant_app_name("alpha", "llama3_8b_chat")
    assert beta.config.generation_app == GENERATOR


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": [user("a"), {**user("b"), "role": "assistant"}]}, "prompts.1"),
        ({"prompts": [user("<|eot_id|>")]}, "prompts.0"),
        # What the reward model's template cannot carry (an attachment).
        (
            {
                "prompts": [
                    {**user("x"), "content": [{"url": "https://a/b.png", "mime_type": "image/png"}]}
                ]
            },
            "prompts.0",
        ),
        ({"reward_scoring": {"generation": {"num_candidates": 0}}}, "generation.num_candidates"),
        ({"reward_scoring": {"generation": {"num_candidates": -1}}}, "generation.num_candidates"),
        ({"reward_scoring": {"filter": {"top_p": 0}}}, "filter.top_p"),
        ({"reward_scoring": {"filter": {"top_p": 1.5}}}, "filter.top_p"),
        ({"reward_scoring": {"filter": {"top_k": 0}}}, "filter.top_k"),
        ({"reward_scoring": {"filter": {"top_pp": 0.5}}}, "filter.top_pp"),
        ({"reward_scoring": {"temperature": 0.5}}, "reward_scoring.temperature"),
        ({"reward_scoring": {"generation": {"model": "nope"}}}, "generation.model"),
        ({"reward_scoring": {"model": "nope"}}, "reward_scoring.model"),
        # The right names, the wrong kinds.
        ({"reward_scoring": {"generation": {"model": "llama3_405b_reward"}}}, "not an llm"),
        ({"reward_scoring": {"model": "llama3_8b_chat"}}, "not a reward"),
    ],
)
def test_bad_parameters_are_422s_naming_the_field(
    service: SyntheticDataService, fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        service.prepare(tenant="alpha", request=request(**fields))
    assert http_status_for(raised.value) == 422
    assert named in raised.value.message


def test_an_unknown_filter_is_refused_by_the_request_model() -> None:
    with pytest.raises(ValueError, match="filtering_function"):
        request(filtering_function="best_of")


# ---------------------------------------------------------------- synchronous limits


def test_beyond_the_sync_cap_the_422_names_the_job_route(service: SyntheticDataService) -> None:
    prompts = [user(f"question {i}") for i in range(3)]  # 3 x 4 > 8
    with pytest.raises(InvalidRequest) as raised:
        service.generate(tenant="alpha", request=request(prompts=prompts))
    assert JOB_ROUTE in raised.value.message
    assert "12 generations" in raised.value.message
    # A job has its own cap (prompts), not this one.
    assert (
        len(service.prepare(tenant="alpha", request=request(prompts=prompts), as_job=True).prompts)
        == 3
    )
    two = {"generation": {"num_candidates": 2}}
    # At the cap it passes the check (and reaches the pipeline, which this test refuses).
    with pytest.raises(AssertionError, match="must not run"):
        service.generate(
            tenant="alpha",
            request=request(
                prompts=[user("a"), user("b"), user("c"), user("d")], reward_scoring=two
            ),
        )


@pytest.mark.parametrize("app", [GENERATOR, REWARD])
def test_an_app_that_is_not_running_is_a_503_before_any_work(
    service: SyntheticDataService, apps: Apps, app: str
) -> None:
    apps.states[app] = AppState(status="DEPLOYING", message="", running_replicas=0)
    with pytest.raises(ModelUnavailable, match=app) as raised:
        service.generate(tenant="alpha", request=request())
    assert http_status_for(raised.value) == 503
    assert retry_after_s(raised.value) is not None


# ---------------------------------------------------------------- jobs


def _stored_launch(database: Database, job_uuid: str, tenant: str = "alpha") -> dict[str, Any]:
    with database.transaction() as session:
        job = JobStore(session).get(job_uuid, tenant=tenant)
        assert job.kind == JobKind.SYNTHETIC_DATA_GENERATION.value
        return dict(job.launch or {})


def test_a_job_stores_a_launch_config_the_recipe_validates(
    service: SyntheticDataService,
    sqlite_database: Database,
    launcher: RecordingLauncher,
    tmp_path: Path,
) -> None:
    summary = service.submit_job(tenant="alpha", request=job_request())
    assert (summary.job_uuid, summary.kind, summary.status) == (
        "sdg-1",
        "synthetic_data_generation",
        "scheduled",
    )
    assert launcher.submitted == [job_key("alpha", "sdg-1")]
    launch = _stored_launch(sqlite_database, "sdg-1")
    assert "database_url" not in launch and "report_to" not in launch
    assert sqlite_database.url not in json.dumps(launch)
    config = SyntheticDataJobConfig.model_validate(launch)
    assert config.job_key == job_key("alpha", "sdg-1")
    assert [p.index for p in config.prompts] == [0, 1]
    assert config.prompts[1].messages[0].content == "Name a fruit."
    assert (config.pipeline.generation_app, config.pipeline.reward_app) == (GENERATOR, REWARD)
    assert config.output.dataset_id == "sdg-1"  # the job's uuid by default
    assert config.output.format == "dpo"
    assert config.output_dir.is_relative_to(tmp_path / "checkpoints")
    assert config.output_dir.name == "sdg-1"
    assert config.output_uri is None


def test_the_same_job_again_is_the_same_job_another_body_is_a_409(
    service: SyntheticDataService, sqlite_database: Database, launcher: RecordingLauncher
) -> None:
    service.submit_job(tenant="alpha", request=job_request())
    again = service.submit_job(tenant="alpha", request=job_request())
    assert again.job_uuid == "sdg-1"
    assert launcher.submitted == [job_key("alpha", "sdg-1")]
    with pytest.raises(Conflict):
        service.submit_job(tenant="alpha", request=job_request(filtering_function="none"))
    # Another tenant's uuid space is its own.
    service.submit_job(tenant="beta", request=job_request())
    assert launcher.submitted[-1] == job_key("beta", "sdg-1")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"job_uuid": "../x"}, "job_uuid"),
        ({"output": {"dataset_id": "bad/id"}}, "output.dataset_id"),
        ({"prompts": [user(str(i)) for i in range(4)]}, "split them"),
        ({"reward_scoring": {"filter": {"top_p": 2}}}, "filter.top_p"),
    ],
)
def test_a_refused_job_stores_nothing(
    service: SyntheticDataService,
    sqlite_database: Database,
    launcher: RecordingLauncher,
    fields: dict[str, Any],
    named: str,
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        service.submit_job(tenant="alpha", request=job_request(**fields))
    assert named in raised.value.message
    assert launcher.submitted == []
    with sqlite_database.transaction() as session:
        assert JobStore(session).find(tenant="alpha", limit=10, offset=0) == []


def test_a_job_whose_reward_app_is_down_is_a_503_and_not_stored(
    service: SyntheticDataService, apps: Apps, launcher: RecordingLauncher
) -> None:
    apps.states[REWARD] = AppState(status="DEPLOY_FAILED", message="boom", running_replicas=0)
    with pytest.raises(ModelUnavailable):
        service.submit_job(tenant="alpha", request=job_request())
    assert launcher.submitted == []


# ---------------------------------------------------------------- answering


class ScriptedRun(PipelineRun):
    """A PipelineRun whose batches are given (out of order), or that fails with `error`
    after the first one."""

    def __init__(self, batches: list[list[PromptOutcome]], error: Exception | None = None):
        super().__init__(prompts=(), config=None)  # type: ignore[arg-type]
        self.scripted = batches
        self.error = error
        self.stage_seconds = {"generate": 1.0, "score": 0.5, "filter": 0.0}

    def batches(self) -> Iterator[list[PromptOutcome]]:
        for batch in self.scripted:
            yield batch
            if self.error is not None:
                raise self.error


def _outcome(index: int, *scores: float) -> PromptOutcome:
    return PromptOutcome(
        index=index,
        candidates=tuple(
            ScoredCandidate(
                text=f"reply {index}.{j}", score=s, kept=s > 0, stop_reason="end_of_turn"
            )
            for j, s in enumerate(scores)
        ),
    )


def _service_running(service: SyntheticDataService, run: ScriptedRun) -> SyntheticDataService:
    service._runner = lambda prompts, config: run  # type: ignore[method-assign]
    return service


def test_the_answer_is_in_prompt_order_with_the_kept_candidates(
    service: SyntheticDataService,
) -> None:
    run = ScriptedRun([[_outcome(1, 2.0, -1.0)], [_outcome(0, -3.0, 0.5)]])
    prompts = [user("first"), user("second")]
    two = {"generation": {"num_candidates": 2}}
    answer = _service_running(service, run).generate(
        tenant="alpha", request=request(prompts=prompts, reward_scoring=two)
    )
    assert [item.prompt.content for item in answer.synthetic_data] == ["first", "second"]
    assert [
        [(g.message.role, g.message.content, g.score) for g in item.k_scored_generations]
        for item in answer.synthetic_data
    ] == [[("assistant", "reply 0.1", 0.5)], [("assistant", "reply 1.0", 2.0)]]
    assert answer.statistics is not None
    assert (answer.statistics["generated"], answer.statistics["kept"]) == (4, 2)
    assert answer.statistics["seconds"]["generate"] == 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("error", "status", "stage"),
    [
        (StageFailed("score", "app gone", unavailable=True), 503, "score"),
        (StageFailed("generate", "engine broke"), 500, "generate"),
    ],
)
def test_a_failed_stage_fails_the_request_naming_it(
    service: SyntheticDataService, error: StageFailed, status: int, stage: str
) -> None:
    run = ScriptedRun([[_outcome(0, 1.0)]], error=error)
    with pytest.raises(CorralError) as raised:
        _service_running(service, run).generate(tenant="alpha", request=request())
    assert http_status_for(raised.value) == status
    assert f"the {stage} stage" in raised.value.message
    assert error.detail in raised.value.message


def test_an_answer_short_of_prompts_is_a_failure(service: SyntheticDataService) -> None:
    run = ScriptedRun([[_outcome(1, 1.0)]])
    with pytest.raises(PipelineFailed, match="1 of 2 prompts"):
        _service_running(service, run).generate(
            tenant="alpha",
            request=request(
                prompts=[user("a"), user("b")], reward_scoring={"generation": {"num_candidates": 2}}
            ),
        )
