"""The generation recipe (`jobs.sdg.job.main`) on a real local Ray cluster: the real Ray
Data pipeline, the demo LLM's Serve app generating and a reward model's Serve app scoring
(a tiny random `LlamaForSequenceClassification`: its scores differ, which is all a DPO
pair needs here). Driven in-process, as `jobs.launch` runs it inside a Ray job; the chain
through the routes and Ray Jobs is tests/api/test_sdg_chain.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import serve

from corral.demo_reward import build_untrained_reward_model
from corral.storage import Storage
from corral.store.datasets import DatasetStore
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.sdg import job
from jobs.sdg.config import (
    DatasetOutput,
    PipelineConfig,
    PromptInput,
    PromptTurn,
    SyntheticDataJobConfig,
    SyntheticDataSettings,
)
from jobs.sdg.dataset import SavedCandidate, SavedOutcome, encode_shard, shard_name
from jobs.sdg.files import DATA_FILE, STATISTICS_FILE
from serve_apps import llm, reward

pytestmark = pytest.mark.integration
LLM_APP = "llm-sdg-job"
REWARD_APP = "reward-sdg-job"
TENANT, UUID = "acme", "gen-ray"


@pytest.fixture(scope="module")
def apps(
    serve_instance: None, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    reward_dir = build_untrained_reward_model(
        demo_model_dir, tmp_path_factory.mktemp("reward") / "m"
    )
    generation = {"name": "sdg-job", "model_dir": str(demo_model_dir), "cpus_per_replica": 0.25}
    serve.run(llm.build_app(generation), name=LLM_APP, route_prefix=None)
    scoring = {"name": "sdg-job-reward", "model_dir": str(reward_dir), "cpus_per_replica": 0.25}
    serve.run(reward.build_app(scoring), name=REWARD_APP, route_prefix=None)
    yield
    for app in (LLM_APP, REWARD_APP):
        serve.delete(app)


def prompt(index: int) -> PromptInput:
    content = f"Tell me about topic {index}"
    return PromptInput(
        index=index,
        generation_prompt=(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            f"{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        messages=(PromptTurn(role="user", content=content),),
    )


def _store(db: Database, config: SyntheticDataJobConfig) -> None:
    """The job's row with its launch config, as the API stores it."""
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid=UUID,
            tenant=TENANT,
            kind=JobKind.SYNTHETIC_DATA_GENERATION,
            request={},
            launch=config.model_dump(mode="json"),
        )


def test_a_resumed_job_generates_the_rest_and_registers_every_prompts_pair(
    apps: None, sqlite_database: Database, tmp_path: Path
) -> None:
    storage = Storage(str(tmp_path / "checkpoints"))
    settings = SyntheticDataSettings.model_validate(
        {"generation": {"num_candidates": 3, "max_tokens": 6, "seed": 5}, "filter": {"top_k": 1}}
    )
    config = SyntheticDataJobConfig(
        job_key=job_key(TENANT, UUID),
        report_to={"database_url": sqlite_database.url},
        pipeline=PipelineConfig(
            filtering_function="top_k",
            settings=settings,
            generation_app=LLM_APP,
            reward_app=REWARD_APP,
            batch_size=2,
        ),
        prompts=tuple(prompt(i) for i in range(6)),
        output=DatasetOutput(format="dpo"),
        output_dir=Path(storage.job_uri(TENANT, UUID).removeprefix("file://")),
    )
    _store(sqlite_database, config)
    # An earlier attempt saved prompts 1 and 2 before it died; their pair is its own.
    saved = [
        SavedOutcome(
            index=i,
            candidates=(
                SavedCandidate("saved best", 1.0, True, "end_of_turn"),
                SavedCandidate("saved worst", -1.0, False, "end_of_turn"),
            ),
        )
        for i in (1, 2)
    ]
    shards = config.output_dir / "batches"
    shards.mkdir(parents=True)
    (shards / shard_name(saved)).write_bytes(encode_shard(saved))

    job.main(config)

    with sqlite_database.transaction() as session:
        store = JobStore(session)
        row = store.get(UUID, tenant=TENANT)
        assert row.status == JobStatus.COMPLETED, row.error
        lines = [line.line for line in store.log_lines(row.key)]
        steps = [m.step for m in store.metrics(row.key, after_step=None, limit=10)]
        dataset = DatasetStore(session).get(tenant=TENANT, uuid=UUID)
        assert dataset is not None
        content_url, row_count = dataset.content_url, dataset.row_count
    assert any("2 done by an earlier attempt, 4 to generate" in line for line in lines)
    assert steps[-1] == 6 and len(steps) == 2  # the 4 others, in 2 batches of 2
    assert len(list(shards.iterdir())) == 3
    rows = [json.loads(line) for line in (config.output_dir / DATA_FILE).read_text().splitlines()]
    assert content_url == (config.output_dir / DATA_FILE).as_uri() and row_count == len(rows)
    by_topic = {r["prompt"][0]["content"]: r for r in rows}
    for i in (1, 2):  # not generated again
        assert by_topic[f"Tell me about topic {i}"]["chosen"] == "saved best"
    generated = [r for r in rows if r["chosen"] != "saved best"]
    assert generated and all(r["chosen"] != r["rejected"] for r in generated)
    figures = json.loads((config.output_dir / STATISTICS_FILE).read_text())
    assert figures["prompts"] == 6 and figures["generated"] == 4 * 3 + 2 * 2
    assert figures["seconds"]["generate"] > 0 and figures["rows"] == len(rows)


def test_an_app_that_is_not_there_fails_the_job_naming_the_stage(
    apps: None, sqlite_database: Database, tmp_path: Path
) -> None:
    config = SyntheticDataJobConfig(
        job_key=job_key(TENANT, UUID),
        report_to={"database_url": sqlite_database.url},
        pipeline=PipelineConfig(generation_app=LLM_APP, reward_app="no-such-reward-app"),
        prompts=(prompt(0),),
        output_dir=tmp_path / "job",
    )
    _store(sqlite_database, config)
    with pytest.raises(Exception, match="score"):
        job.main(config)
    with sqlite_database.transaction() as session:
        row = JobStore(session).get(UUID, tenant=TENANT)
        assert row.status == JobStatus.FAILED
        assert "stage 'score'" in (row.error or "") and "no-such-reward-app" in (row.error or "")
