"""Synthetic data generation over HTTP against real Serve apps and the real pipeline: the
demo model on the transformers engine generates (`llama3_8b_chat`), the test's rule
reward app (the reward app's `score` method, hand-computable scores) scores
(`llama3_405b_reward`). Every answer is checked against the OpenAPI document
(tests/api/conftest.py). The sync route per spec, its caps and refusals, a model app
that is down (503), and the job route with the generic job routes and `corral sdg`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from ray import serve

from corral.app import create_app
from corral.config import Settings
from corral.services.models import build_model_service
from corral.serving.catalog import ModelSpec, file_app_name, model_roots
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from corral.store.jobs import JobStore
from corral.tenancy import job_key
from jobs.reporting import JobReporter
from jobs.transport import DatabaseTransport
from serve_apps.llm import build_app
from tests.api.conftest import ALPHA, API_KEYS, BETA
from tests.api.test_fine_tuning_api import RecordingLauncher
from tests.jobs.rule_reward import build_rule_reward, rule_score

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

LLM = "sdg-api-llm"
REWARD = "sdg-api-reward"
DOWN = "sdg-api-reward-down"  # a reward model whose app is not deployed


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "tool_calls": [], "tool_responses": []}


def generation(filtering: str, **scoring: Any) -> dict[str, Any]:
    return {
        "prompts": [user("Name a colour."), user("Name a fruit.")],
        "filtering_function": filtering,
        "reward_scoring": {"generation": {"num_candidates": 3, "max_tokens": 6, "seed": 3}}
        | scoring,
    }


@pytest.fixture(scope="module")
def apps(serve_instance: None, demo_model_dir: Path) -> Iterator[None]:
    llm = {"name": LLM, "model_dir": str(demo_model_dir), "cpus_per_replica": 0.25}
    serve.run(build_app(llm | {"max_batch_size": 8}), name=file_app_name(LLM), route_prefix=None)
    serve.run(build_rule_reward(), name=file_app_name(REWARD), route_prefix=None)
    yield
    for name in (LLM, REWARD):
        serve.delete(file_app_name(name))


@pytest.fixture
def launcher() -> RecordingLauncher:
    return RecordingLauncher()


@pytest.fixture
def client(
    apps: None,
    sqlite_database: Database,
    tmp_path: Path,
    demo_model_dir: Path,
    launcher: RecordingLauncher,
) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path / "home",
        api_keys=API_KEYS,
        sdg_max_sync_generations=8,
        reconcile_interval_s=3600,
    )
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[
            ModelSpec(name=LLM, aliases=["llama3_8b_chat"], checkpoint_dir=demo_model_dir),
            ModelSpec(
                name=REWARD,
                kind="reward",
                aliases=["llama3_405b_reward"],
                checkpoint_dir=demo_model_dir,
            ),
            ModelSpec(name=DOWN, kind="reward", checkpoint_dir=demo_model_dir),
        ],
        model_roots=model_roots(settings),
    )
    app = create_app(settings, database=sqlite_database, models=registry, launcher=launcher)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _generate(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/synthetic_data_generation/generate", json=body, headers=ALPHA)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_generate_scores_filters_and_answers_per_spec(client: TestClient) -> None:
    everything = _generate(client, generation("none"))
    prompts = [item["prompt"]["content"] for item in everything["synthetic_data"]]
    assert prompts == ["Name a colour.", "Name a fruit."]
    for item in everything["synthetic_data"]:
        scored = item["k_scored_generations"]
        assert len(scored) == 3
        assert all(g["message"]["role"] == "assistant" for g in scored)
        # The reward app scored exactly the generated text.
        assert [g["score"] for g in scored] == [rule_score(g["message"]["content"]) for g in scored]
    figures = everything["statistics"]
    assert (figures["prompts"], figures["generated"], figures["kept"]) == (2, 6, 6)
    assert figures["seconds"]["total"] > 0

    # The same seeds, top_k 1: each prompt's best candidate of the run above.
    best = _generate(client, generation("top_k", filter={"top_k": 1}))
    for kept, every in zip(best["synthetic_data"], everything["synthetic_data"], strict=True):
        top = max(every["k_scored_generations"], key=lambda g: g["score"])
        assert kept["k_scored_generations"] == [top]
    assert (best["statistics"]["kept"], best["statistics"]["filtered"]) == (2, 4)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (generation("best_of"), "filtering_function"),
        (generation("top_p", filter={"top_p": 0}), "reward_scoring.filter.top_p"),
        (generation("none", extra=1), "reward_scoring.extra"),
        (generation("none") | {"prompts": []}, "prompts"),
        # 2 prompts x 5 candidates is beyond this server's cap of 8.
        (
            generation("none") | {"reward_scoring": {"generation": {"num_candidates": 5}}},
            "/synthetic_data_generation/jobs",
        ),
    ],
)
def test_bad_requests_are_422s(client: TestClient, body: dict[str, Any], named: str) -> None:
    response = client.post("/synthetic_data_generation/generate", json=body, headers=ALPHA)
    assert response.status_code == 422, response.text
    assert named in response.json()["error"]["message"]


def test_a_reward_model_that_is_down_is_a_503(client: TestClient) -> None:
    body = generation("none", model=DOWN)
    response = client.post("/synthetic_data_generation/generate", json=body, headers=ALPHA)
    assert response.status_code == 503, response.text
    assert file_app_name(DOWN) in response.json()["error"]["message"]
    assert int(response.headers["Retry-After"]) > 0
    job = client.post(
        "/synthetic_data_generation/jobs", json=body | {"job_uuid": "down"}, headers=ALPHA
    )
    assert job.status_code == 503
    assert client.get("/jobs/down", headers=ALPHA).status_code == 404  # nothing stored


def test_the_job_route_and_the_generic_job_routes(
    client: TestClient, launcher: RecordingLauncher
) -> None:
    body = generation("top_k") | {"job_uuid": "gen-1", "output": {"format": "sft"}}
    submitted = client.post("/synthetic_data_generation/jobs", json=body, headers=ALPHA)
    assert submitted.status_code == 200, submitted.text
    assert submitted.json()["kind"] == "synthetic_data_generation"
    assert submitted.json()["status"] == "scheduled"
    again = client.post("/synthetic_data_generation/jobs", json=body, headers=ALPHA)
    assert again.status_code == 200
    assert launcher.submitted == [job_key("alpha", "gen-1")]
    other = client.post(
        "/synthetic_data_generation/jobs", json=body | {"filtering_function": "none"}, headers=ALPHA
    )
    assert other.status_code == 409

    assert client.get("/jobs/gen-1", headers=ALPHA).json()["kind"] == "synthetic_data_generation"
    assert client.get("/jobs/gen-1", headers=BETA).status_code == 404
    listed = client.get("/jobs", params={"kind": "synthetic_data_generation"}, headers=ALPHA)
    assert [job["job_uuid"] for job in listed.json()["data"]] == ["gen-1"]
    # Not a post-training job.
    status = client.get("/post_training/job/status", params={"job_uuid": "gen-1"}, headers=ALPHA)
    assert status.status_code == 404
    cancelled = client.post("/jobs/gen-1/cancel", headers=ALPHA)
    assert cancelled.json()["status"] == "cancelled"


def test_corral_sdg_runs_and_follows_a_job_and_generates(
    client: TestClient,
    sqlite_database: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from corral.cli import CliError, remote, run
    from corral.client import CorralClient

    client.headers.update(ALPHA)
    monkeypatch.setattr(remote, "connect", lambda _url: CorralClient.over(client))

    request_file = tmp_path / "request.yaml"
    request_file.write_text(yaml.safe_dump(generation("top_k") | {"output": {"dataset_id": "d1"}}))
    with pytest.raises(CliError, match="no job_uuid"):
        run(["sdg", "run", str(request_file)])

    # The job runs in the background (as the recipe reports) once it is stored, while
    # --follow shows it.
    key = job_key("alpha", "cli-gen")

    def job() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sqlite_database.transaction() as session:
                if JobStore(session).status_of(key) is not None:
                    break
            time.sleep(0.05)
        reporter = JobReporter(DatabaseTransport(sqlite_database, key))
        reporter.started(resources_allocated={})
        reporter.plan(total_steps=1)
        reporter.metrics(step=1, epoch=None)
        reporter.completed()

    worker = threading.Thread(target=job)
    worker.start()
    code = run(
        ["sdg", "run", str(request_file), "--job-uuid", "cli-gen", "--follow", "--poll", "0.1"]
    )
    worker.join()
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "submitted cli-gen (dataset d1)"
    assert lines[-2].endswith("completed")
    assert lines[-1].startswith("dataset d1 is registered")

    json_file = tmp_path / "request.json"
    json_file.write_text(json.dumps(generation("top_k")))
    assert run(["sdg", "generate", str(json_file)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [len(item["k_scored_generations"]) for item in answer["synthetic_data"]] == [1, 1]
