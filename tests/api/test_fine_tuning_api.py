"""Submitting, listing and cancelling fine-tuning jobs over HTTP, on both database
backends. The model registry and the dataset fetcher are the real ones; Ray is replaced by
a launcher that records what it was asked (the same `JobLauncher` protocol the Ray Jobs
client implements; that one is tested against a real cluster in tests/services and the
end-to-end test)."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.api.datasets import Dataset
from corral.config import Settings
from corral.ray_jobs import RayJobInfo, RayJobState, RayJobsUnavailable
from corral.services.reconciler import Reconciler
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.store.tables import Job
from corral.tenancy import job_checkpoint_dir, job_key
from jobs.reporting import JobReporter
from jobs.transport import DatabaseTransport
from tests.api.conftest import ALPHA, BETA, training_app

pytestmark = pytest.mark.integration

SFT_PATH = "/post_training/supervised_fine_tune/"
DPO_PATH = "/post_training/preference_optimize/"


def A(job_uuid: str) -> str:  # reads like the tenant it stands for
    """The key (Ray submission id) of tenant alpha's job `job_uuid`."""
    return job_key("alpha", job_uuid)


class RecordingLauncher:
    """A `JobLauncher` that remembers submissions and stops instead of running them."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.stopped: list[str] = []

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        if job_key in self.submitted:
            return False
        self.submitted.append(job_key)
        return True

    def info(self, job_key: str) -> RayJobInfo | None:
        return None

    def stop(self, job_key: str) -> bool:
        self.stopped.append(job_key)
        return job_key in self.submitted


@pytest.fixture
def launcher() -> RecordingLauncher:
    return RecordingLauncher()


@pytest.fixture
def client(
    settings: Settings, database: Database, launcher: RecordingLauncher, demo_model_dir: Path
) -> Iterator[TestClient]:
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=launcher)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _dialog(question: str, answer: str) -> dict[str, Any]:
    return {
        "dialog": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def _write(root: Path, name: str, rows: list[dict[str, Any]]) -> str:
    path = root / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.as_uri()


def _dataset(url: str, columns: dict[str, str] | None = None) -> dict[str, Any]:
    return {"columns": columns or {"dialog": "dialog"}, "content_url": url, "metadata": {}}


TRAINING = {
    "n_epochs": 2,
    "batch_size": 1,
    "shuffle": True,
    "n_iters": 10,
    "enable_activation_checkpointing": False,
    "memory_efficient_fsdp_wrap": False,
    "fsdp_cpu_offload": False,
}
OPTIMIZER = {"optimizer_type": "adamw", "lr": 1e-3, "lr_min": 1e-4, "weight_decay": 0.0}
LORA = {
    "lora_attn_modules": ["q_proj", "v_proj"],
    "apply_lora_to_mlp": False,
    "apply_lora_to_output": False,
    "rank": 4,
    "alpha": 8,
}


@pytest.fixture
def sft_request(dataset_root: Path) -> dict[str, Any]:
    train = _write(dataset_root, "train.jsonl", [_dialog("hi", "hello"), _dialog("2+2?", "4")])
    val = _write(dataset_root, "val.jsonl", [_dialog("hey", "hello")])
    return {
        "job_uuid": "sft-1",
        "model": "llama3_8b",
        "dataset": _dataset(train),
        "validation_dataset": _dataset(val),
        "algorithm": "lora",
        "algorithm_config": LORA,
        "optimizer_config": OPTIMIZER,
        "training_config": TRAINING,
        "hyperparam_search_config": {},
        "logger_config": {},
    }


def _stored_jobs(database: Database) -> list[Job]:
    with database.transaction() as session:
        return list(session.query(Job).all())


def test_a_valid_request_stores_a_scheduled_job_and_submits_it_once(
    client: TestClient,
    database: Database,
    launcher: RecordingLauncher,
    sft_request: dict[str, Any],
    settings: Settings,
    demo_model_dir: Path,
) -> None:
    response = client.post(SFT_PATH, json=sft_request, headers=ALPHA)
    assert response.status_code == 200, response.text
    assert launcher.submitted == [A("sft-1")]
    (job,) = _stored_jobs(database)
    assert (job.uuid, job.tenant, job.status) == ("sft-1", "alpha", "scheduled")
    launch = job.launch
    assert launch is not None
    assert launch["model_dir"] == str(demo_model_dir)
    assert launch["output_dir"] == str(
        job_checkpoint_dir(settings.checkpoints_dir, "alpha", "sft-1")
    )
    assert launch["job_key"] == A("sft-1")
    assert launch["rows"][1]["dialog"][1] == {"role": "assistant", "content": "4"}
    assert [r["dialog"][0]["content"] for r in launch["validation_rows"]] == ["hey"]
    assert launch["adapter"]["rank"] == 4 and launch["algorithm"] == "lora"
    assert (launch["zero_stage"], launch["cpu_offload"]) == (None, False)
    # Where the job reports comes from its environment, never from what is stored.
    assert "database_url" not in launch and "report_to" not in launch
    assert database.url not in json.dumps(launch)

    status = client.get("/post_training/job/status", params={"job_uuid": "sft-1"}, headers=ALPHA)
    assert status.json()["status"] == "scheduled"

    # The same request again: nothing new is stored or submitted.
    assert client.post(SFT_PATH, json=sft_request, headers=ALPHA).status_code == 200
    assert launcher.submitted == [A("sft-1")]
    assert len(_stored_jobs(database)) == 1


def test_the_same_uuid_with_another_request_is_a_conflict(
    client: TestClient, database: Database, launcher: RecordingLauncher, sft_request: dict[str, Any]
) -> None:
    assert client.post(SFT_PATH, json=sft_request, headers=ALPHA).status_code == 200
    other = copy.deepcopy(sft_request)
    other["training_config"]["n_epochs"] = 3
    response = client.post(SFT_PATH, json=other, headers=ALPHA)
    assert response.status_code == 409
    assert "different request" in response.json()["error"]["message"]
    assert launcher.submitted == [A("sft-1")]
    (job,) = _stored_jobs(database)
    assert job.request["training_config"]["n_epochs"] == 2


def test_another_tenant_may_use_the_same_uuid_and_learns_nothing(
    client: TestClient, database: Database, launcher: RecordingLauncher, sft_request: dict[str, Any]
) -> None:
    """uuids live in each tenant's namespace: beta's `sft-1` is its own job (a 409 would
    tell beta that someone has one), run under its own Ray id and checkpoint folder."""
    assert client.post(SFT_PATH, json=sft_request, headers=ALPHA).status_code == 200
    theirs = copy.deepcopy(sft_request)
    for field in ("dataset", "validation_dataset"):
        dataset = Dataset.model_validate(theirs[field])
        rows = client.app.state.services.datasets.load_rows(dataset, tenant="alpha")
        theirs[field]["content_url"] = _data_url(rows)
    theirs["training_config"]["n_epochs"] = 1
    response = client.post(SFT_PATH, json=theirs, headers=BETA)
    assert response.status_code == 200, response.text
    assert launcher.submitted == [A("sft-1"), job_key("beta", "sft-1")]
    jobs = {job.tenant: job for job in _stored_jobs(database)}
    assert {tenant: job.uuid for tenant, job in jobs.items()} == {"alpha": "sft-1", "beta": "sft-1"}
    assert jobs["alpha"].launch is not None and jobs["beta"].launch is not None
    assert jobs["alpha"].launch["output_dir"] != jobs["beta"].launch["output_dir"]
    mine = client.get("/post_training/job", params={"job_uuid": "sft-1"}, headers=ALPHA).json()
    assert mine["status"] == "scheduled"
    status = client.get("/post_training/job/status", params={"job_uuid": "sft-1"}, headers=BETA)
    assert status.json()["job_uuid"] == "sft-1"


def _data_url(rows: list[dict[str, Any]]) -> str:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    return "data:application/jsonl;base64," + base64.b64encode(text.encode()).decode()


def test_training_config_maps_onto_zero_offload_and_checkpointing(
    client: TestClient, database: Database, sft_request: dict[str, Any]
) -> None:
    sft_request["training_config"] |= {
        "memory_efficient_fsdp_wrap": True,
        "fsdp_cpu_offload": True,
        "enable_activation_checkpointing": True,
    }
    assert client.post(SFT_PATH, json=sft_request, headers=ALPHA).status_code == 200
    (job,) = _stored_jobs(database)
    assert job.launch is not None
    assert job.launch["zero_stage"] == 3
    assert job.launch["cpu_offload"] is True
    assert job.launch["activation_checkpointing"] is True


def _bad(request: dict[str, Any], dataset_root: Path, case: str) -> dict[str, Any]:
    bad = copy.deepcopy(request)
    if case == "job_uuid":
        bad["job_uuid"] = "../escape"
    elif case == "unknown model":
        bad["model"] = "llama3_70b"  # a spec name this server does not serve
    elif case == "missing column":
        url = _write(dataset_root, "text.jsonl", [{"text": "hello"}])
        bad["dataset"] = _dataset(url, {"text": "text"})
    elif case == "wrong column type":
        url = _write(dataset_root, "dialog-as-text.jsonl", [{"dialog": "hello"}])
        bad["dataset"] = _dataset(url, {"dialog": "text"})
    elif case == "row without the column":
        url = _write(dataset_root, "holes.jsonl", [_dialog("a", "b"), {"other": 1}])
        bad["validation_dataset"] = _dataset(url)
    elif case == "no assistant turn":
        url = _write(
            dataset_root, "questions.jsonl", [{"dialog": [{"role": "user", "content": "hi"}]}]
        )
        bad["dataset"] = _dataset(url)
    elif case == "empty assistant turn":
        rows = [_dialog("hi", "hello"), _dialog("and?", " ")]
        bad["validation_dataset"] = _dataset(_write(dataset_root, "blank.jsonl", rows))
    elif case == "content not text":
        row = _dialog("hi", "hello")
        row["dialog"][1]["content"] = ["hel", "lo"]
        bad["dataset"] = _dataset(_write(dataset_root, "parts.jsonl", [row]))
    elif case == "unreachable dataset":
        bad["dataset"] = _dataset("file:///etc/passwd")
    elif case == "hyperparam search":
        bad["hyperparam_search_config"] = {"lr": [1e-3, 1e-4]}
    elif case == "logger":
        bad["logger_config"] = {"wandb": {"project": "x"}}
    elif case == "tensorboard not a flag":
        bad["logger_config"] = {"tensorboard": "yes"}
    elif case == "bad optimizer":
        bad["optimizer_config"]["lr_min"] = 1.0
    elif case == "no epochs":
        bad["training_config"]["n_epochs"] = 0
    return bad


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("job_uuid", "job_uuid"),
        ("unknown model", "not known"),
        ("missing column", "must declare the column 'dialog'"),
        ("wrong column type", "of type 'dialog'"),
        ("row without the column", "validation_dataset: row 1 has no column 'dialog'"),
        ("no assistant turn", "rows[0]: dialog has no assistant turn with text"),
        ("empty assistant turn", "validation_rows[1]: dialog has no assistant turn with text"),
        ("content not text", "rows[0]: dialog[1]: content must be text"),
        ("unreachable dataset", "dataset"),
        ("hyperparam search", "hyperparam_search_config is not supported"),
        ("logger", "logger_config is not supported"),
        ("tensorboard not a flag", "logger_config is not supported as sent (tensorboard:"),
        ("bad optimizer", "lr_min"),
        ("no epochs", "n_epochs"),
    ],
)
def test_bad_requests_are_refused_up_front_and_store_nothing(
    client: TestClient,
    database: Database,
    launcher: RecordingLauncher,
    sft_request: dict[str, Any],
    dataset_root: Path,
    case: str,
    message: str,
) -> None:
    response = client.post(SFT_PATH, json=_bad(sft_request, dataset_root, case), headers=ALPHA)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]
    assert _stored_jobs(database) == []
    assert launcher.submitted == []


def _dpo_request(dataset_root: Path, model_url: str) -> dict[str, Any]:
    rows = [
        {
            "prompt": [{"role": "user", "content": "Name a colour."}],
            "chosen": "Blue.",
            "rejected": "I will not.",
        }
    ]
    columns = {"prompt": "dialog", "chosen": "text", "rejected": "text"}
    url = _write(dataset_root, "prefs.jsonl", rows)
    return {
        "job_uuid": "dpo-1",
        "finetuned_model": model_url,
        "dataset": _dataset(url, columns),
        "validation_dataset": _dataset(url, columns),
        "algorithm": "dpo",
        "algorithm_config": {"reward_scale": 0.1, "reward_clip": 0, "epsilon": 0, "gamma": 0},
        "optimizer_config": OPTIMIZER,
        "training_config": TRAINING,
        "hyperparam_search_config": {},
        "logger_config": {},
    }


def test_preference_optimization_takes_one_of_the_tenants_own_checkpoints(
    client: TestClient,
    database: Database,
    launcher: RecordingLauncher,
    settings: Settings,
    dataset_root: Path,
    demo_model_dir: Path,
) -> None:
    checkpoint = (
        job_checkpoint_dir(settings.checkpoints_dir, "alpha", "sft-0") / "checkpoints" / "iter-4"
    )
    shutil.copytree(demo_model_dir, checkpoint)

    elsewhere = settings.home.parent / "elsewhere"
    shutil.copytree(demo_model_dir, elsewhere)
    outside = _dpo_request(dataset_root, elsewhere.as_uri())
    response = client.post(DPO_PATH, json=outside, headers=ALPHA)
    assert response.status_code == 422
    assert "your own jobs" in response.json()["error"]["message"]

    no_columns = _dpo_request(dataset_root, checkpoint.as_uri())
    no_columns["dataset"]["columns"] = {"prompt": "dialog", "chosen": "text"}
    response = client.post(DPO_PATH, json=no_columns, headers=ALPHA)
    assert response.status_code == 422
    assert "'rejected'" in response.json()["error"]["message"]
    assert _stored_jobs(database) == [] and launcher.submitted == []

    good = _dpo_request(dataset_root, checkpoint.as_uri())
    response = client.post(DPO_PATH, json=good, headers=ALPHA)
    assert response.status_code == 200, response.text
    (job,) = _stored_jobs(database)
    assert (job.kind, job.status) == ("preference_optimize", "scheduled")
    assert job.launch is not None and job.launch["model_dir"] == str(checkpoint)
    assert job.launch["rows"][0]["chosen"] == "Blue."
    assert launcher.submitted == [A("dpo-1")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": ""}, "rows[0]: chosen must be a non-empty string"),
        ({"rejected": "  "}, "rows[0]: rejected must be a non-empty string"),
        (
            {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "rows[0]: prompt must end with a user turn",
        ),
    ],
)
def test_preference_rows_are_checked_before_anything_is_stored(
    client: TestClient,
    database: Database,
    launcher: RecordingLauncher,
    settings: Settings,
    dataset_root: Path,
    demo_model_dir: Path,
    row: dict[str, Any],
    message: str,
) -> None:
    checkpoint = (
        job_checkpoint_dir(settings.checkpoints_dir, "alpha", "sft-0") / "checkpoints" / "iter-4"
    )
    shutil.copytree(demo_model_dir, checkpoint)
    request = _dpo_request(dataset_root, checkpoint.as_uri())
    good = {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": "Blue.",
        "rejected": "No.",
    }
    url = _write(dataset_root, "bad-prefs.jsonl", [good | row])
    request["dataset"]["content_url"] = url
    response = client.post(DPO_PATH, json=request, headers=ALPHA)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]
    assert _stored_jobs(database) == [] and launcher.submitted == []


def _submit(client: TestClient, request: dict[str, Any], uuid: str) -> None:
    response = client.post(SFT_PATH, json=request | {"job_uuid": uuid}, headers=ALPHA)
    assert response.status_code == 200, response.text


def test_list_filters_by_status_pages_and_keeps_tenants_apart(
    client: TestClient, database: Database, sft_request: dict[str, Any]
) -> None:
    for index in range(5):
        _submit(client, sft_request, f"job-{index}")
    with database.transaction() as session:
        JobStore(session).transition(A("job-1"), to=JobStatus.RUNNING)
        JobStore(session).transition(A("job-3"), to=JobStatus.RUNNING)

    def page(**params: Any) -> dict[str, Any]:
        response = client.get("/post_training/jobs", params=params, headers=ALPHA)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    first = page(limit=2)
    second = page(limit=2, offset=first["next_offset"])
    third = page(limit=2, offset=second["next_offset"])
    uuids = [job["job_uuid"] for p in (first, second, third) for job in p["data"]]
    assert sorted(uuids) == [f"job-{index}" for index in range(5)]
    assert "next_offset" not in third or third["next_offset"] is None

    running = page(status="running")
    assert sorted(job["job_uuid"] for job in running["data"]) == ["job-1", "job-3"]
    both = page(status=["running", "scheduled"])
    assert len(both["data"]) == 5
    assert (
        client.get("/post_training/jobs", params={"status": "done"}, headers=ALPHA).status_code
        == 422
    )
    assert client.get("/post_training/jobs", headers=BETA).json()["data"] == []


def test_one_job_shows_progress_from_its_metrics(
    client: TestClient, database: Database, settings: Settings, sft_request: dict[str, Any]
) -> None:
    _submit(client, sft_request, "job-p")
    reporter = JobReporter(DatabaseTransport(database, A("job-p")))
    reporter.started(resources_allocated={"num_workers": 2})
    reporter.plan(total_steps=8, detail="2 epochs")
    reporter.metrics(step=1, epoch=1, loss=2.5, learning_rate=1e-3, tokens_per_second=100)
    reporter.metrics(step=2, epoch=1, loss=2.25, learning_rate=1e-3, tokens_per_second=100)
    reporter.log("step 9 loss 0.1000")  # log lines are for people: progress ignores them
    own = job_checkpoint_dir(settings.checkpoints_dir, "alpha", "job-p")  # the job's own
    reporter.checkpoint(iters=2, path=str(own / "checkpoints" / "iter-2"))
    body = client.get("/post_training/job", params={"job_uuid": "job-p"}, headers=ALPHA).json()
    assert body["status"] == "running"
    assert body["progress"] == {"step": 2, "total_steps": 8, "loss": 2.25}
    assert body["checkpoints"] == 1
    missing = client.get("/post_training/job", params={"job_uuid": "job-p"}, headers=BETA)
    assert missing.status_code == 404


def test_tensorboard_files_are_asked_for_in_logger_config_and_listed(
    client: TestClient, settings: Settings, sft_request: dict[str, Any]
) -> None:
    _submit(client, sft_request | {"logger_config": {"tensorboard": True}}, "job-tb")
    _submit(client, sft_request, "job-plain")
    body = client.get("/post_training/job", params={"job_uuid": "job-tb"}, headers=ALPHA).json()
    output_dir = job_checkpoint_dir(settings.checkpoints_dir, "alpha", "job-tb")
    assert body["tensorboard_url"] == (output_dir / "tensorboard").resolve().as_uri()
    plain = client.get("/post_training/job", params={"job_uuid": "job-plain"}, headers=ALPHA)
    assert plain.json()["tensorboard_url"] is None
    # The spec's artifacts hold checkpoints only.
    artifacts = client.get(
        "/post_training/job/artifacts", params={"job_uuid": "job-tb"}, headers=ALPHA
    )
    assert artifacts.json() == {"job_uuid": "job-tb", "checkpoints": []}


def test_cancel_records_the_end_stops_ray_and_a_late_completion_cannot_undo_it(
    client: TestClient, database: Database, launcher: RecordingLauncher, sft_request: dict[str, Any]
) -> None:
    _submit(client, sft_request, "job-c")
    reporter = JobReporter(DatabaseTransport(database, A("job-c")))
    reporter.started(resources_allocated={"num_workers": 2})

    response = client.post("/post_training/job/cancel", json={"job_uuid": "job-c"}, headers=ALPHA)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert launcher.stopped == [A("job-c")]

    again = client.post("/post_training/job/cancel", json={"job_uuid": "job-c"}, headers=ALPHA)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    assert not reporter.completed().applied  # the job finishing afterwards changes nothing
    status = client.get("/post_training/job/status", params={"job_uuid": "job-c"}, headers=ALPHA)
    assert status.json()["status"] == "failed"  # the spec's enum has no "cancelled"
    summary = client.get("/post_training/job", params={"job_uuid": "job-c"}, headers=ALPHA)
    assert (summary.json()["status"], summary.json()["error"]) == ("cancelled", "cancelled")
    logs = client.get("/post_training/job/logs", params={"job_uuid": "job-c"}, headers=ALPHA)
    assert "cancelled on request" in logs.json()["log_lines"]


def test_cancel_of_a_finished_or_foreign_job_changes_nothing(
    client: TestClient, database: Database, launcher: RecordingLauncher, sft_request: dict[str, Any]
) -> None:
    _submit(client, sft_request, "job-d")
    reporter = JobReporter(DatabaseTransport(database, A("job-d")))
    reporter.started(resources_allocated={})
    foreign = client.post("/post_training/job/cancel", json={"job_uuid": "job-d"}, headers=BETA)
    assert foreign.status_code == 404
    reporter.completed()
    late = client.post("/post_training/job/cancel", json={"job_uuid": "job-d"}, headers=ALPHA)
    assert late.status_code == 409
    assert "already completed" in late.json()["error"]["message"]
    assert launcher.stopped == []
    with database.transaction() as session:
        assert JobStore(session).status_of(A("job-d")) is JobStatus.COMPLETED


def test_the_jobs_cli_submits_follows_lists_and_cancels(
    client: TestClient,
    database: Database,
    settings: Settings,
    sft_request: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from corral.cli import CliError, remote, run
    from corral.client import CorralClient

    client.headers.update(ALPHA)
    # The commands' own HTTP client is swapped for one on the test client.
    monkeypatch.setattr(remote, "connect", lambda _url: CorralClient.over(client))
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))

    def corral(*argv: str) -> str:
        assert run(["jobs", *argv]) == 0
        return capsys.readouterr().out

    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(sft_request | {"job_uuid": "cli-1"}))
    assert corral("submit", str(request_file)) == "submitted cli-1\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sft_request | {"job_uuid": "cli-2", "logger_config": {"x": 1}}))
    with pytest.raises(CliError, match="422 logger_config is not supported"):
        corral("submit", str(bad))

    # The job runs in the background while `status --follow` redraws its progress.
    reporter = JobReporter(DatabaseTransport(database, A("cli-1")))
    checkpoint_dir = job_checkpoint_dir(settings.checkpoints_dir, "alpha", "cli-1") / "checkpoints"

    def train() -> None:
        reporter.started(resources_allocated={"num_workers": 2})
        reporter.plan(total_steps=4)
        for step in range(1, 5):
            time.sleep(0.3)
            reporter.log(f"step {step} loss {3.0 / step:.4f} lr 1.000e-03 tokens/s 50")
            reporter.metrics(step=step, epoch=1, loss=3.0 / step)
        reporter.checkpoint(iters=4, path=f"{checkpoint_dir}/iter-4")
        reporter.completed()

    worker = threading.Thread(target=train)
    worker.start()
    lines = corral("status", "cli-1", "--follow", "--poll", "0.1").splitlines()
    worker.join()
    assert lines[-1] == f"cli-1 [{'#' * 30}] 4/4 steps  loss 0.7500  completed"
    assert any("] 2/4 steps" in line for line in lines)  # it showed the job under way

    assert "step 4 loss 0.7500" in corral("logs", "cli-1")
    # The per-step records, from the real metrics route.
    rows = [line.split() for line in corral("metrics", "cli-1").splitlines()]
    assert rows == [["STEP", "EPOCH", "LOSS"], ["1", "1", "3"], *rows[2:]]
    assert [row[0] for row in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[-1] == ["4", "1", "0.75"]
    assert corral("artifacts", "cli-1").split() == ["4", f"file://{checkpoint_dir}/iter-4"]

    request_file.write_text(json.dumps(sft_request | {"job_uuid": "cli-3"}))
    corral("submit", str(request_file))
    assert corral("cancel", "cli-3") == "cli-3: cancelled\n"
    table = corral("list", "--status", "cancelled", "--status", "completed").splitlines()
    assert table[0].split()[:3] == ["JOB", "KIND", "STATUS"]
    assert sorted(row.split()[:3][::2] for row in table[1:]) == [
        ["cli-1", "completed"],
        ["cli-3", "cancelled"],
    ]
    with pytest.raises(CliError, match="already completed"):
        corral("cancel", "cli-1")

    # The same, as JSON for scripts.
    listed = json.loads(corral("list", "--status", "cancelled", "--json"))
    assert [job["job_uuid"] for job in listed["data"]] == ["cli-3"]
    status = json.loads(corral("status", "cli-1", "--json"))
    assert status["job"]["progress"] == {"step": 4, "total_steps": 4, "loss": 0.75}
    assert status["status"]["status"] == "completed"
    assert json.loads(corral("artifacts", "cli-1", "--json"))["checkpoints"][0]["iters"] == 4
    log_lines = [json.loads(line) for line in corral("logs", "cli-1", "--json").splitlines()]
    assert "step 4 loss 0.7500 lr 1.000e-03 tokens/s 50" in log_lines


@pytest.mark.parametrize(
    ("use_gpu", "totals", "need"),
    [
        (False, {"CPU": 16.0}, {"CPU": 2.0}),
        (True, {"CPU": 16.0, "GPU": 8.0}, {"GPU": 2.0}),
    ],
)
def test_a_job_gets_the_configured_workers_and_its_need_is_stored(
    settings: Settings,
    database: Database,
    launcher: RecordingLauncher,
    demo_model_dir: Path,
    sft_request: dict[str, Any],
    use_gpu: bool,
    totals: dict[str, float],
    need: dict[str, float],
) -> None:
    app = training_app(
        settings.model_copy(update={"train_use_gpu": use_gpu}),
        database,
        model_dir=demo_model_dir,
        launcher=launcher,
        cluster_resources=lambda: totals,
        available_resources=lambda: totals,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(SFT_PATH, json=sft_request, headers=ALPHA).status_code == 200
        job = client.get("/jobs/sft-1", headers=ALPHA).json()
    [stored] = _stored_jobs(database)
    assert stored.launch is not None and stored.launch["num_workers"] == 2
    assert (stored.need, job["need"], job["queue_position"]) == (need, need, None)
    assert job["admitted_at"] is not None and launcher.submitted == [A("sft-1")]


@pytest.mark.parametrize(
    ("use_gpu", "totals"),
    [
        (False, {"CPU": 1.0}),  # two workers, one CPU: never shrunk to one worker
        (True, {"CPU": 4.0}),  # GPU workers on a cluster without GPUs
    ],
)
def test_a_job_the_cluster_can_never_run_is_refused_and_nothing_is_stored(
    settings: Settings,
    database: Database,
    launcher: RecordingLauncher,
    demo_model_dir: Path,
    sft_request: dict[str, Any],
    use_gpu: bool,
    totals: dict[str, float],
) -> None:
    app = training_app(
        settings.model_copy(update={"train_use_gpu": use_gpu}),
        database,
        model_dir=demo_model_dir,
        launcher=launcher,
        cluster_resources=lambda: totals,
        available_resources=lambda: totals,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(SFT_PATH, json=sft_request, headers=ALPHA)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "job_too_large"
    kind = "GPU" if use_gpu else "CPU"
    assert f"needs 2 {kind}" in error["message"] and "never" in error["message"]
    assert _stored_jobs(database) == [] and launcher.submitted == []


def test_a_job_that_does_not_fit_now_is_queued_with_its_reason_in_every_view(
    settings: Settings,
    database: Database,
    launcher: RecordingLauncher,
    demo_model_dir: Path,
    sft_request: dict[str, Any],
) -> None:
    """Ray's totals can run it, what is free now cannot: the job stays scheduled, and
    Corral's view, the spec's status (its free-form `resources_allocated`) and the log
    say why and where it is in the queue."""
    app = training_app(
        settings,
        database,
        model_dir=demo_model_dir,
        launcher=launcher,
        cluster_resources=lambda: {"CPU": 4.0},
        available_resources=lambda: {"CPU": 1.0},
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(SFT_PATH, json=sft_request, headers=ALPHA).status_code == 200
        job = client.get("/jobs/sft-1", headers=ALPHA).json()
        listed = client.get("/post_training/jobs", headers=ALPHA).json()["data"]
        params = {"job_uuid": "sft-1"}
        status = client.get("/post_training/job/status", params=params, headers=ALPHA)
        logs = client.get("/jobs/sft-1/logs", headers=ALPHA).json()["log_lines"]
    reason = "waiting for 2 CPU; 1 free"
    assert (job["status"], job["queue_position"], job["queue_reason"]) == ("scheduled", 1, reason)
    assert job["admitted_at"] is None and listed[0]["queue_reason"] == reason
    assert status.status_code == 200
    assert status.json()["resources_allocated"] == {
        "need": {"CPU": 2.0},
        "queue_position": 1,
        "queue_reason": reason,
    }
    assert logs == [f"queued: {reason}"]
    assert launcher.submitted == []


class UnreachableLauncher(RecordingLauncher):
    """Ray's Jobs API is down: every call fails the way the real client's do."""

    def submit(self, job_uuid: str, *, attempt: int = 0) -> bool:
        raise RayJobsUnavailable("the Ray Jobs API at http://head:8265: connection refused")


def test_a_job_ray_cannot_take_yet_is_kept_scheduled_for_the_reconciler(
    settings: Settings, database: Database, demo_model_dir: Path, sft_request: dict[str, Any]
) -> None:
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=UnreachableLauncher())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(SFT_PATH, json=sft_request, headers=ALPHA)
        assert response.status_code == 200, response.text
        logs = client.get("/post_training/job/logs", params={"job_uuid": "sft-1"}, headers=ALPHA)
    assert logs.json()["log_lines"] == [
        "waiting for Ray: the Ray Jobs API at http://head:8265: connection refused"
    ]
    up = RecordingLauncher()
    settled = Reconciler(database=database, launcher=up).settle()
    assert [(s.job_key, s.action) for s in settled] == [(A("sft-1"), "submitted")]
    assert up.submitted == [A("sft-1")]


class FlakyRayLauncher(RecordingLauncher):
    """Ray's own view of each submitted job, and a switch that makes Ray unreachable."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.states: dict[str, RayJobInfo] = {}

    def _check(self) -> None:
        if self.down:
            raise RayJobsUnavailable("the Ray Jobs API at http://head:8265: connection refused")

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        self._check()
        self.states[job_key] = RayJobInfo(RayJobState.RUNNING)
        return super().submit(job_key)

    def info(self, job_key: str) -> RayJobInfo | None:
        self._check()
        return self.states.get(job_key)

    def stop(self, job_key: str) -> bool:
        self._check()
        self.stopped.append(job_key)
        return True


def test_a_cancel_while_ray_is_unreachable_holds_and_the_ray_job_is_stopped_later(
    settings: Settings, database: Database, demo_model_dir: Path, sft_request: dict[str, Any]
) -> None:
    ray = FlakyRayLauncher()
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=ray)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post(SFT_PATH, json=sft_request, headers=ALPHA).status_code == 200
        JobReporter(DatabaseTransport(database, A("sft-1"))).started(resources_allocated={})
        ray.down = True
        response = client.post(
            "/post_training/job/cancel", json={"job_uuid": "sft-1"}, headers=ALPHA
        )
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["stop_pending"]) == ("cancelled", True)
        logs = client.get("/post_training/job/logs", params={"job_uuid": "sft-1"}, headers=ALPHA)
        assert any("it is stopped once Ray answers" in line for line in logs.json()["log_lines"])

        # Ray answers again; its job still runs: the reconciler stops it, and clears the
        # pending stop once Ray says it ended.
        ray.down = False
        reconciler = Reconciler(database=database, launcher=ray)
        assert [s.action for s in reconciler.settle()] == ["stopped"]
        assert ray.stopped == [A("sft-1")]
        ray.states[A("sft-1")] = RayJobInfo(RayJobState.STOPPED)
        assert [s.action for s in reconciler.settle()] == ["stop confirmed"]
        summary = client.get("/post_training/job", params={"job_uuid": "sft-1"}, headers=ALPHA)
        assert (summary.json()["status"], summary.json()["stop_pending"]) == ("cancelled", False)


def _stored_job(database: Database, uuid: str, *, running: bool = False) -> str:
    with database.transaction() as session:
        store = JobStore(session)
        key = store.create(
            job_uuid=uuid, tenant="alpha", kind=JobKind.SUPERVISED_FINE_TUNE, request={"n": uuid}
        ).job.key
        if running:
            store.transition(key, to=JobStatus.RUNNING)
    return key


def _wait_for_status(database: Database, key: str, status: JobStatus, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with database.transaction() as session:
            current = JobStore(session).status_of(key)
        if current is status:
            return
        assert time.monotonic() < deadline, f"job {key} is {current}, not {status}"
        time.sleep(0.05)


def test_the_app_settles_jobs_at_start_up_and_one_bad_row_does_not_stop_it(
    settings: Settings, database: Database, demo_model_dir: Path
) -> None:
    """A job stored (scheduled) while no API ran is submitted before the first request is
    served; a row whose settling raises is logged and skipped, and the app starts."""
    waiting = _stored_job(database, "stored-while-down")
    poison = _stored_job(database, "poison", running=True)
    ray = FlakyRayLauncher()
    original_info = ray.info

    def info(job_key: str) -> RayJobInfo | None:
        if job_key == poison:
            raise ValueError("a bug that only this row triggers")
        return original_info(job_key)

    ray.info = info  # type: ignore[method-assign]
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=ray)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert ray.submitted == [waiting]  # before any request
        listed = client.get("/post_training/jobs", headers=ALPHA)
        assert listed.status_code == 200
        assert {job["job_uuid"] for job in listed.json()["data"]} == {"stored-while-down", "poison"}


def test_the_app_settles_a_finished_job_periodically_with_no_request_made(
    tmp_path: Path, dataset_root: Path, database: Database, demo_model_dir: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        api_keys="alpha:key-alpha",
        dataset_roots=str(dataset_root),
        reconcile_interval_s=0.2,
    )
    key = _stored_job(database, "finishes-later", running=True)
    ray = FlakyRayLauncher()
    ray.states[key] = RayJobInfo(RayJobState.RUNNING)
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=ray)
    with TestClient(app, raise_server_exceptions=False):
        # The driver exits 0 without having written its row (e.g. killed after training).
        ray.states[key] = RayJobInfo(RayJobState.SUCCEEDED)
        _wait_for_status(database, key, JobStatus.COMPLETED, timeout_s=10)
