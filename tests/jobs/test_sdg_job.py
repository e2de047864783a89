"""The generation recipe (jobs/sdg/job.py) on a real SQLite store and a real job
directory, with a pipeline that implements `run_pipeline`'s protocol in plain Python
(the Ray Data pipeline itself runs in tests/jobs/test_sdg_job_ray.py): lifecycle,
per-batch shards and metrics, resume, cancellation, failures, and the registered dataset."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.services.jobs import JobsService
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
)
from jobs.sdg.dataset import SavedCandidate, SavedOutcome, encode_shard, shard_name
from jobs.sdg.files import DATA_FILE, STATISTICS_FILE
from jobs.sdg.pipeline import StageFailed

pytestmark = pytest.mark.integration
TENANT = "acme"
UUID = "gen-1"


def prompts(n: int) -> tuple[PromptInput, ...]:
    return tuple(
        PromptInput(
            index=i,
            generation_prompt=f"<question {i}>",
            messages=(PromptTurn(role="user", content=f"question {i}"),),
        )
        for i in range(n)
    )


def scored(prompt: PromptInput) -> SavedOutcome:
    """Three candidates; the longer the better, the last one filtered out."""
    texts = [f"r{prompt.index}", f"reply {prompt.index}", f"a long reply {prompt.index}"]
    return SavedOutcome(
        index=prompt.index,
        candidates=tuple(
            SavedCandidate(text, float(len(text)), kept=j < 2, stop_reason="stop")
            for j, text in enumerate(texts)
        ),
    )


@dataclass
class FakeRun:
    prompts: Sequence[PromptInput]
    config: PipelineConfig
    on_batch: Any = None
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"generate": 0.5, "score": 0.25, "filter": 0.0}
    )

    def batches(self) -> Iterator[list[SavedOutcome]]:
        size = self.config.batch_size
        for start in range(0, len(self.prompts), size):
            if self.on_batch is not None:
                self.on_batch(start // size)
            yield [scored(p) for p in self.prompts[start : start + size]]


@dataclass
class FakePipeline:
    """`run_pipeline`'s protocol; records the prompts each run was given."""

    on_batch: Any = None
    asked: list[list[int]] = field(default_factory=list)

    def __call__(self, prompts: Sequence[PromptInput], config: PipelineConfig) -> FakeRun:
        self.asked.append([p.index for p in prompts])
        return FakeRun(prompts, config, self.on_batch)


def fail_at(batch: int, error: Exception, *, times: int | None = None) -> Any:
    """An `on_batch` that raises `error` before batch `batch` (`times` runs, or every run)."""
    raised = 0

    def check(index: int) -> None:
        nonlocal raised
        if index == batch and (times is None or raised < times):
            raised += 1
            raise error

    return check


def statistics(outcomes: Sequence[Any], stage_seconds: Any, *, wall_s: float) -> dict[str, Any]:
    return {"prompts": len(outcomes), "stage_seconds": dict(stage_seconds), "wall_s": wall_s}


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "checkpoints"))


def make_config(
    db: Database, storage: Storage, *, n: int = 5, output: DatasetOutput | None = None
) -> SyntheticDataJobConfig:
    config = SyntheticDataJobConfig(
        job_key=job_key(TENANT, UUID),
        report_to={"database_url": db.url},
        pipeline=PipelineConfig(generation_app="llm", reward_app="reward", batch_size=2),
        prompts=prompts(n),
        output=output or DatasetOutput(format="dpo"),
        output_dir=Path(storage.job_uri(TENANT, UUID).removeprefix("file://")),
    )
    store_job(db, UUID, config)
    return config


def store_job(db: Database, uuid: str, config: SyntheticDataJobConfig) -> None:
    """The job's row with its launch config, as the API stores it."""
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid=uuid,
            tenant=TENANT,
            kind=JobKind.SYNTHETIC_DATA_GENERATION,
            request={},
            launch=config.model_dump(mode="json"),
        )


def run(config: SyntheticDataJobConfig, pipeline: FakePipeline) -> None:
    job.run(config, run_pipeline=pipeline, statistics=statistics)


def stored(db: Database) -> tuple[Any, list[str], list[Any]]:
    with db.transaction() as session:
        store = JobStore(session)
        row = store.get(UUID, tenant=TENANT)
        session.expunge(row)
        lines = [line.line for line in store.log_lines(row.key)]
        metrics = [(m.step, m.values) for m in store.metrics(row.key, after_step=None, limit=100)]
        return row, lines, metrics


def test_a_run_saves_each_batch_reports_it_and_registers_a_dpo_dataset(
    sqlite_database: Database, storage: Storage
) -> None:
    config = make_config(sqlite_database, storage)
    pipeline = FakePipeline()
    run(config, pipeline)

    row, lines, metrics = stored(sqlite_database)
    assert row.status == JobStatus.COMPLETED, row.error
    assert pipeline.asked == [[0, 1, 2, 3, 4]]
    assert [step for step, _ in metrics] == [2, 4, 5]  # prompts done after each batch
    assert metrics[-1][1]["candidates_generated"] == 15
    assert metrics[-1][1]["candidates_kept"] == 10
    assert any(line.startswith("plan: 5 steps") for line in lines)
    names = sorted(p.name for p in (config.output_dir / "batches").iterdir())
    assert [name.split("-")[:2] for name in names] == [["0", "1"], ["2", "3"], ["4", "4"]]

    rows = [json.loads(line) for line in (config.output_dir / DATA_FILE).read_text().splitlines()]
    assert rows[0] == {
        "prompt": [{"role": "user", "content": "question 0"}],
        "chosen": "reply 0",  # the best kept (the longest was filtered out)
        "rejected": "r0",
    }
    assert len(rows) == 5
    figures = json.loads((config.output_dir / STATISTICS_FILE).read_text())
    assert figures["prompts"] == 5 and figures["rows"] == 5

    with sqlite_database.transaction() as session:
        dataset = DatasetStore(session).get(tenant=TENANT, uuid=UUID)  # id: the job's uuid
        assert dataset is not None and dataset.row_count == 5
        assert dataset.columns == {"prompt": "dialog", "chosen": "text", "rejected": "text"}
        assert dataset.content_url == (config.output_dir / DATA_FILE).as_uri()
        assert DatasetStore(session).get(tenant="other", uuid=UUID) is None


def test_an_sft_dataset_under_its_own_id(sqlite_database: Database, storage: Storage) -> None:
    config = make_config(
        sqlite_database, storage, n=3, output=DatasetOutput(format="sft", dataset_id="my-sft")
    )
    run(config, FakePipeline())
    rows = [json.loads(line) for line in (config.output_dir / DATA_FILE).read_text().splitlines()]
    assert rows[1] == {
        "dialog": [
            {"role": "user", "content": "question 1"},
            {"role": "assistant", "content": "reply 1"},
        ]
    }
    with sqlite_database.transaction() as session:
        dataset = DatasetStore(session).get(tenant=TENANT, uuid="my-sft")
        assert dataset is not None and dataset.columns == {"dialog": "dialog"}


def test_a_resumed_attempt_runs_only_the_prompts_no_shard_holds(
    sqlite_database: Database, storage: Storage
) -> None:
    config = make_config(sqlite_database, storage, n=5)
    # An earlier attempt finished prompts 1 and 3 (one batch), then died mid-write of
    # another: its temporary file is not a shard.
    shards = config.output_dir / "batches"
    shards.mkdir(parents=True)
    earlier = [scored(p) for p in prompts(5) if p.index in (1, 3)]
    (shards / shard_name(earlier)).write_bytes(encode_shard(earlier))
    (shards / ".0-0-x.jsonl.123.tmp").write_text('{"index": 0, "candi')

    pipeline = FakePipeline()
    run(config, pipeline)
    row, lines, metrics = stored(sqlite_database)
    assert row.status == JobStatus.COMPLETED, row.error
    assert pipeline.asked == [[0, 2, 4]]
    assert any("2 done by an earlier attempt, 3 to generate" in line for line in lines)
    assert [step for step, _ in metrics] == [4, 5]  # counted from the 2 already done
    rows = (config.output_dir / DATA_FILE).read_text().splitlines()
    assert [json.loads(r)["chosen"] for r in rows] == [f"reply {i}" for i in range(5)]


def test_an_attempt_with_every_prompt_saved_only_writes_the_dataset(
    sqlite_database: Database, storage: Storage
) -> None:
    config = make_config(sqlite_database, storage, n=2)
    saved = [scored(p) for p in prompts(2)]
    shards = config.output_dir / "batches"
    shards.mkdir(parents=True)
    (shards / shard_name(saved)).write_bytes(encode_shard(saved))
    pipeline = FakePipeline()
    run(config, pipeline)
    assert pipeline.asked == []
    assert stored(sqlite_database)[0].status == JobStatus.COMPLETED


def test_a_job_cancelled_while_it_runs_stops_and_registers_nothing(
    sqlite_database: Database, storage: Storage
) -> None:
    config = make_config(sqlite_database, storage, n=6)
    jobs = JobsService(database=sqlite_database)  # no launcher: the record only

    def cancel_during_the_second_batch(batch: int) -> None:
        if batch == 1:
            jobs.cancel(tenant=TENANT, job_uuid=UUID)

    run(config, FakePipeline(on_batch=cancel_during_the_second_batch))
    row, lines, _ = stored(sqlite_database)
    assert row.status == JobStatus.CANCELLED
    assert any("generation stops here" in line for line in lines)
    assert len(list((config.output_dir / "batches").iterdir())) == 1  # the first batch only
    assert not (config.output_dir / DATA_FILE).exists()
    with sqlite_database.transaction() as session:
        assert DatasetStore(session).find(tenant=TENANT) == []


def test_a_stage_failure_fails_the_job_naming_the_stage(
    sqlite_database: Database, storage: Storage
) -> None:
    config = make_config(sqlite_database, storage)
    pipeline = FakePipeline(on_batch=fail_at(1, StageFailed("score", "the model refused")))
    with pytest.raises(StageFailed):
        run(config, pipeline)
    row, _, _ = stored(sqlite_database)
    assert row.status == JobStatus.FAILED
    assert row.error == "synthetic data generation failed in stage 'score': the model refused"
    assert len(pipeline.asked) == 1  # not an app that went away: no second run


def test_a_stage_whose_app_went_away_resumes_the_unfinished_prompts(
    sqlite_database: Database, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job, "RESUME_WAIT_S", 0.0)
    config = make_config(sqlite_database, storage, n=5)
    lost = StageFailed("generate", "app 'llm' is unavailable (ActorDiedError)", unavailable=True)
    pipeline = FakePipeline(on_batch=fail_at(1, lost, times=1))
    run(config, pipeline)
    row, lines, _ = stored(sqlite_database)
    assert row.status == JobStatus.COMPLETED, row.error
    assert pipeline.asked == [[0, 1, 2, 3, 4], [2, 3, 4]]
    assert any("resumes its unfinished prompts" in line for line in lines)
    assert len((config.output_dir / DATA_FILE).read_text().splitlines()) == 5


def test_an_app_that_stays_away_fails_the_job_after_the_last_resume(
    sqlite_database: Database, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job, "RESUME_WAIT_S", 0.0)
    config = make_config(sqlite_database, storage, n=5)
    lost = StageFailed("score", "app 'reward' is unavailable", unavailable=True)
    pipeline = FakePipeline(on_batch=fail_at(0, lost))
    with pytest.raises(StageFailed):
        run(config, pipeline)
    assert len(pipeline.asked) == job.MAX_RESUMES + 1
    assert stored(sqlite_database)[0].status == JobStatus.FAILED


def test_a_short_run_fails_rather_than_write_a_short_dataset(
    sqlite_database: Database, storage: Storage
) -> None:
    config = make_config(sqlite_database, storage, n=4)

    class Short(FakePipeline):
        def __call__(self, prompts: Sequence[PromptInput], config: PipelineConfig) -> FakeRun:
            return FakeRun(prompts[:3], config)

    with pytest.raises(RuntimeError):
        run(config, Short())
    row, _, _ = stored(sqlite_database)
    assert row.status == JobStatus.FAILED
    assert row.error == "the pipeline returned 3 of 4 prompts (none for prompt 3)"


def test_no_rows_fails_and_registers_no_empty_dataset(
    sqlite_database: Database, storage: Storage
) -> None:
    # Every pair is within a margin of 100: nothing is left to prefer.
    config = make_config(
        sqlite_database, storage, n=2, output=DatasetOutput(format="dpo", min_margin=100)
    )
    with pytest.raises(RuntimeError):
        run(config, FakePipeline())
    row, _, _ = stored(sqlite_database)
    assert row.status == JobStatus.FAILED
    assert "no dpo rows from 2 prompts (dropped: 2 margin)" in (row.error or "")
    with sqlite_database.transaction() as session:
        assert DatasetStore(session).find(tenant=TENANT) == []


def test_a_dataset_id_taken_by_other_content_fails_the_job_naming_it(
    sqlite_database: Database, storage: Storage
) -> None:
    config = make_config(
        sqlite_database, storage, n=2, output=DatasetOutput(format="dpo", dataset_id="prefs")
    )
    with sqlite_database.transaction() as session:
        DatasetStore(session).add(
            tenant=TENANT,
            uuid="prefs",
            columns={"dialog": "dialog"},
            content_url="file:///elsewhere.jsonl",
            metadata={},
            request_digest="x",
            row_count=1,
        )
    with pytest.raises(Exception, match="prefs"):
        run(config, FakePipeline())
    row, _, _ = stored(sqlite_database)
    assert row.status == JobStatus.FAILED
    assert row.error == "dataset 'prefs' already exists with other content"


def test_the_same_content_under_a_taken_id_completes(
    sqlite_database: Database, storage: Storage
) -> None:
    """A second job making the very same rows (same seeds) under the same dataset id."""
    config = make_config(
        sqlite_database, storage, n=2, output=DatasetOutput(format="dpo", dataset_id="prefs")
    )
    run(config, FakePipeline())
    second = config.model_copy(
        update={
            "job_key": job_key(TENANT, "gen-2"),
            "output_dir": Path(storage.job_uri(TENANT, "gen-2").removeprefix("file://")),
        }
    )
    store_job(sqlite_database, "gen-2", second)
    run(second, FakePipeline())
    with sqlite_database.transaction() as session:
        assert JobStore(session).get("gen-2", tenant=TENANT).status == JobStatus.COMPLETED
        dataset = DatasetStore(session).get(tenant=TENANT, uuid="prefs")
        assert dataset is not None and UUID in dataset.content_url  # the first job's file
