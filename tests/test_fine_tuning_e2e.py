"""Fine-tuning end to end over HTTP on the embedded defaults (`corral serve`, its own Ray
head, SQLite): a LoRA job teaches the demo model one answer while the API server is killed
and restarted under it on the same port (the job reports there, with its own token, and
retries while nothing answers); the job runs once, completes, and its checkpoint, served as
a model, answers with what the dataset taught. Then the jobs dashboard, in headless
Chromium against the same server and job, signs in and draws the job's curve.

The job (a few minutes) is the module's, shared by both tests: the module fixture runs
it up to its completion on the restarted server, which stays up for both."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from corral.config import Settings
from corral.demo import (
    DEMO_TENANT,
    TEACH_ANSWER,
    TEACH_QUESTION,
    corral_server,
    greedy_chat,
    teaching_dialogs,
    teaching_request,
)
from corral.ray_cluster import LocalRayHead
from corral.tenancy import job_key, tenant_dir
from tests.browser import (
    LOSS_RGB,
    TIMEOUT_MS,
    VALIDATION_RGB,
    PageErrors,
    assert_not_blank,
    chromium,
    colour_pixels,
    curve_points,
    sign_in,
)
from tests.conftest import embedded_home_in

# own_ray: the module's home runs `corral serve`'s embedded Ray head (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_ray]

JOB = "e2e-lora-1"


def _until(what: str, check: Any, timeout_s: float, poll_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)
    return result


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    return response.json() if response.content else None


def _ray_jobs(home: Path) -> list[dict[str, Any]]:
    """Every job the embedded head's Jobs API knows, read with the head's own token."""
    head = LocalRayHead(home)
    record = head.find()
    assert record is not None
    token = head.token_path.read_text().strip()
    response = httpx.get(
        f"{record.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    jobs: list[dict[str, Any]] = _ok(response)
    return jobs


@dataclass(frozen=True)
class FinishedJob:
    """The module's LoRA job, completed, on the restarted `corral serve` still running."""

    home: Path
    base_url: str
    key: str
    database_url: str

    def api(self, timeout_s: float = 600) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)


@pytest.fixture(scope="module")
def finished_job(
    tmp_path_factory: pytest.TempPathFactory,
    demo_llama_guard_dir: Path,
    demo_prompt_guard_dir: Path,
) -> Iterator[FinishedJob]:
    """The job submitted to a first server, which is killed at its first step; a second
    server finds it still running (the reconciler at start-up) and sees it complete."""
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        embedded_home_in(tmp_path_factory, demo_llama_guard_dir, demo_prompt_guard_dir) as home,
    ):
        for name in ("CORRAL_API_KEYS", "CORRAL_DATABASE_URL", "RAY_ADDRESS", "CORRAL_MODELS_FILE"):
            monkeypatch.delenv(name, raising=False)
        settings = Settings(home=home)
        datasets = tenant_dir(home / "datasets", DEMO_TENANT)  # the server's one key's tenant
        datasets.mkdir(parents=True)
        teach = datasets / "teach.jsonl"
        teach.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in teaching_dialogs()))
        key = secrets.token_urlsafe(16)
        headers = {"Authorization": f"Bearer {key}"}
        dataset = {"columns": {"dialog": "dialog"}, "content_url": teach.as_uri(), "metadata": {}}

        with corral_server(settings, api_key=key) as first:
            with httpx.Client(base_url=first.base_url, headers=headers, timeout=120) as api:
                _ok(api.post("/datasets/create", json={"uuid": "teach", "dataset": dataset}))
                _ok(
                    api.post(
                        "/post_training/supervised_fine_tune/",
                        json=teaching_request(JOB, dataset, dataset),
                    )
                )

                def training() -> bool:
                    job = _ok(api.get("/post_training/job", params={"job_uuid": JOB}))
                    progress = job["progress"] or {}
                    return job["status"] == "running" and progress.get("step", 0) >= 1

                _until("the first training step", training, timeout_s=300)
            first.process.kill()  # no clean shutdown: the API process just dies
            first.process.wait()

        # Back on the same port: the job reports to the address it was given, and retries
        # while nothing answers there.
        port = int(urlsplit(first.base_url).port or 0)
        with (
            corral_server(settings, api_key=key, port=port) as second,
            httpx.Client(base_url=second.base_url, headers=headers, timeout=600) as api,
        ):
            # The reconciler ran at start-up and found the job still running in Ray.
            job = _ok(api.get("/post_training/job", params={"job_uuid": JOB}))
            assert job["status"] in {"running", "completed"}, job

            def finished() -> dict[str, Any] | None:
                job = _ok(api.get("/post_training/job", params={"job_uuid": JOB}))
                return job if job["status"] in {"completed", "failed", "cancelled"} else None

            job = _until("the job to finish", finished, timeout_s=900, poll_s=2)
            assert job["status"] == "completed", job
            yield FinishedJob(
                home=home,
                base_url=second.base_url,
                key=key,
                database_url=settings.resolved_database_url,
            )


def test_a_lora_job_survives_an_api_restart_runs_once_and_learns(
    finished_job: FinishedJob,
) -> None:
    home = finished_job.home
    with finished_job.api() as api:
        status = _ok(api.get("/post_training/job/status", params={"job_uuid": JOB}))
        assert status["resources_allocated"]["num_workers"] == 2
        assert status["started_at"] <= status["completed_at"]
        lines = _ok(api.get("/post_training/job/logs", params={"job_uuid": JOB}))["log_lines"]
        # One run: one attempt started, no second submission, nothing re-settled.
        assert sum(line.startswith("attempt ") for line in lines) == 1, lines
        assert not any(line.startswith("reconciler") for line in lines), lines
        ray_jobs = [j for j in _ray_jobs(home) if j["submission_id"] == job_key(DEMO_TENANT, JOB)]
        assert len(ray_jobs) == 1
        # What the Ray dashboard shows of the job: its key, token and the API's address,
        # never the store (docs/job_credentials.md).
        shown = json.dumps(ray_jobs[0])
        env = ray_jobs[0]["runtime_env"]["env_vars"]
        assert env["CORRAL_INTERNAL_URL"] == finished_job.base_url
        assert env["CORRAL_JOB_TOKEN"].startswith("cjt1.")
        assert "CORRAL_DATABASE_URL" not in shown and finished_job.database_url not in shown
        losses = [float(m[1]) for line in lines if (m := re.search(r"validation loss (\S+)", line))]
        # Where its start-up went, once each (jobs/phases.py), timed from the submission.
        for phase in (
            "driver ready ",
            "worker group ready ",
            "tokenizer loaded and ",
            "model loaded and prepared ",
            "baseline validated in ",
            "first step took ",
        ):
            assert sum(line.startswith(f"phase: {phase}") for line in lines) == 1, (phase, lines)
        assert any(
            re.search(r"^phase: first step .* logged [\d.]+ s after submission$", line)
            for line in lines
        ), lines
        assert losses[-1] < 0.25 * losses[0], losses

        artifacts = _ok(api.get("/post_training/job/artifacts", params={"job_uuid": JOB}))
        assert len(artifacts["checkpoints"]) == 8  # one per epoch
        adapter = Path(unquote(urlsplit(artifacts["checkpoints"][-1]["path"]).path))
        assert (adapter / "adapter_config.json").is_file()
        # The base model, asked first, does not know the answer.
        question = greedy_chat("llama3_8b_chat", TEACH_QUESTION)
        before = _ok(api.post("/inference/chat_completion", json=question))
        assert before["content"].strip() != TEACH_ANSWER
        # Registered under the spec's name, the checkpoint answers for this tenant.
        register = {
            "name": "llama3_8b_chat",
            "checkpoint_dir": str(home / "models" / "demo"),
            "adapter_dir": str(adapter),
            "source_job_uuid": JOB,
        }
        _ok(api.post("/models/register", json=register))
        after = _ok(api.post("/inference/chat_completion", json=question))
        assert after["content"].strip() == TEACH_ANSWER


def test_the_dashboard_draws_the_jobs_curve_in_a_browser(
    finished_job: FinishedJob, tmp_path: Path
) -> None:
    with finished_job.api(timeout_s=60) as api:
        metrics = _ok(api.get(f"/jobs/{JOB}/metrics", params={"limit": 10_000}))
    assert metrics["next_after_step"] is None
    rows = metrics["data"]
    stored = {
        series: sum(series in row["values"] for row in rows)
        for series in ("loss", "validation_loss")
    }
    assert stored["loss"] > 0 and stored["validation_loss"] > 0, stored

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        errors = PageErrors()
        errors.watch(page)
        sign_in(page, finished_job.base_url, finished_job.key)

        row = page.locator(f'#jobs tr[data-job-uuid="{JOB}"]')
        assert row.locator("td.state").text_content() == "completed"
        assert page.locator("#detail").get_attribute("data-job-uuid") == JOB
        assert page.locator("#metric-count").get_attribute("data-count") == str(len(rows))
        assert curve_points(page) == stored
        assert page.locator("#checkpoints").get_attribute("data-count") == "8"
        assert "attempt " in (page.locator("#log-tail").text_content() or "")

        screenshot = page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert_not_blank(screenshot)
        curve = page.locator("#curve svg").screenshot()
        assert colour_pixels(curve, LOSS_RGB) > 200, "the loss line is not drawn"
        assert colour_pixels(curve, VALIDATION_RGB) > 50, "the validation line is not drawn"
        assert errors.messages == [], errors.messages
