"""The jobs dashboard in headless Chromium against a live server (uvicorn on SQLite, no
Ray: the test writes the job rows a job would write): signing in through the form, the
tenant's jobs only, the curve growing while a job runs and the polling going idle when
every job has finished, queue fields shown when the job view has them, server data shown
as text (no markup from a job id, an error or a log line runs), no CSP refusal or script
error, a screenshot that is not blank, and signing out.

The same page against a real fine-tuning job on `corral serve`: tests/test_fine_tuning_e2e.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.app import create_app
from corral.config import Settings
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from tests.api.conftest import API_KEYS
from tests.api.live_server import live_server
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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIVE = "live-1"
QUEUED = "queued-1"
HOSTILE = '<img src=x onerror="alert(1)">'
HOSTILE_ERROR = "<b>boom</b><script>alert(2)</script>"
HOSTILE_LOG = "<script>alert(3)</script> & <i>not italic</i>"


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def server(tmp_path: Path, sqlite_database: Database) -> Iterator[str]:
    settings = Settings(home=tmp_path / "home", api_keys=API_KEYS)
    with live_server(create_app(settings, database=sqlite_database)) as base_url:
        yield base_url


def _record(database: Database, uuid: str, step: int, **values: float) -> None:
    with database.transaction() as session:
        JobStore(session).record_metrics(job_key("alpha", uuid), step=step, values=values)


def _seed(database: Database) -> None:
    """Beta's job; alpha's hostile-named failed job, queued job, and running job (newest,
    so the page opens on it) with three steps of loss and one validation."""
    with database.transaction() as session:
        store = JobStore(session)
        store.create(
            job_uuid="beta-secret", tenant="beta", kind=JobKind.SUPERVISED_FINE_TUNE, request={}
        )
        store.create(job_uuid=HOSTILE, tenant="alpha", kind=JobKind.PREFERENCE_OPTIMIZE, request={})
        hostile = job_key("alpha", HOSTILE)
        store.transition(hostile, to=JobStatus.RUNNING)
        store.append_log(hostile, HOSTILE_LOG)
        store.transition(hostile, to=JobStatus.FAILED, error=HOSTILE_ERROR)
        store.create(
            job_uuid=QUEUED, tenant="alpha", kind=JobKind.SYNTHETIC_DATA_GENERATION, request={}
        )
        store.create(job_uuid=LIVE, tenant="alpha", kind=JobKind.SUPERVISED_FINE_TUNE, request={})
        live = job_key("alpha", LIVE)
        store.transition(live, to=JobStatus.RUNNING)
        store.append_log(live, "attempt 0 started", "step 1 loss 2.4")
        store.add_checkpoint(live, iters=2, path="/srv/ckpt/live-1/2")
    for step, loss in ((1, 2.4), (2, 1.9), (3, 1.5)):
        _record(database, LIVE, step, loss=loss)
    _record(database, LIVE, 2, validation_loss=2.0)


def _with_queue_fields(route: Any) -> None:
    """The job list as it reads once scheduled jobs carry their queue position and
    reason (another part of the API adds them): the page must show them."""
    response = route.fetch()
    body = response.json()
    for job in body["data"]:
        if job["status"] == "scheduled":
            job |= {"queue_position": 2, "queue_reason": "waiting for 4 GPUs"}
    route.fulfill(response=response, body=json.dumps(body))


def _wait_for(page: Any, expression: str) -> None:
    # As a function: a bare expression would be evaluated by `eval`, which the page's
    # CSP (rightly) refuses.
    page.wait_for_function(f"() => {expression}", timeout=TIMEOUT_MS)


def test_the_page_follows_a_running_job_and_shows_server_data_as_text(
    browser: Any, server: str, sqlite_database: Database, tmp_path: Path
) -> None:
    _seed(sqlite_database)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = PageErrors()
    errors.watch(page)
    page.route(re.compile(r"/jobs\?"), _with_queue_fields)

    sign_in(page, server, "key-alpha")
    assert page.locator("#tenant").text_content() == "tenant alpha"
    rows = page.locator("#jobs tbody tr")
    listed = [rows.nth(i).get_attribute("data-job-uuid") for i in range(rows.count())]
    assert listed == [LIVE, QUEUED, HOSTILE], "alpha's jobs, newest first, and only alpha's"
    queued = page.locator(f'#jobs tr[data-job-uuid="{QUEUED}"]')
    assert queued.locator("td.queue").text_content() == "#2 · waiting for 4 GPUs"
    live_row = page.locator(f'#jobs tr[data-job-uuid="{LIVE}"]')
    assert live_row.locator("td.state").text_content() == "running"

    # The running job is open: its curve, checkpoints and log.
    assert page.locator("#detail").get_attribute("data-job-uuid") == LIVE
    assert curve_points(page) == {"loss": 3, "validation_loss": 1}
    assert page.locator("#checkpoints").get_attribute("data-count") == "1"
    assert "step 1 loss 2.4" in (page.locator("#log-tail").text_content() or "")
    assert page.locator("body").get_attribute("data-polling") == "active"

    # The job goes on: the page draws the new steps by itself, including a validation
    # figure recorded apart from its step's training loss.
    _record(sqlite_database, LIVE, 4, loss=1.2)
    _record(sqlite_database, LIVE, 5, loss=1.0)
    _wait_for(page, "document.querySelector('#curve svg').dataset.lossPoints === '5'")
    _record(sqlite_database, LIVE, 5, validation_loss=1.3)
    _wait_for(page, "document.querySelector('#curve svg').dataset.validationLossPoints === '2'")
    assert curve_points(page) == {"loss": 5, "validation_loss": 2}
    assert page.locator("#metric-count").get_attribute("data-count") == "5"

    screenshot = page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert_not_blank(screenshot)
    curve = page.locator("#curve svg").screenshot()
    assert colour_pixels(curve, LOSS_RGB) > 200, "the loss line is not drawn"
    assert colour_pixels(curve, VALIDATION_RGB) > 50, "the validation line is not drawn"

    # Every job finishes: the rows say so, and the fast polling stops.
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        store.transition(job_key("alpha", LIVE), to=JobStatus.COMPLETED)
        store.transition(job_key("alpha", QUEUED), to=JobStatus.CANCELLED, error="cancelled")
    _wait_for(
        page,
        f"document.querySelector('#jobs tr[data-job-uuid=\"{LIVE}\"]')"
        ".dataset.status === 'completed'",
    )
    _wait_for(page, "document.body.dataset.polling === 'idle'")
    assert page.locator("#job-state").text_content() == "completed"

    # Markup in a job id, an error and a log line is shown as text, and never runs.
    rows.nth(listed.index(HOSTILE)).locator("button").click()
    _wait_for(page, "document.querySelector('#detail').dataset.jobUuid.startsWith('<img')")
    _wait_for(page, "document.querySelector('#log-tail').dataset.lines === '1'")
    assert page.locator("img").count() == 0
    assert page.locator("#detail script, #jobs script, b, i").count() == 0
    assert page.locator("#job-title").text_content() == f"{HOSTILE} (preference_optimize)"
    assert page.locator("#job-error").text_content() == HOSTILE_ERROR
    assert page.locator("#log-tail").text_content() == HOSTILE_LOG
    assert page.locator("#metric-count").get_attribute("data-count") == "0"
    assert errors.messages == [], errors.messages

    # Signing out ends the session: the page is the form again.
    page.click("#logout button")
    page.wait_for_url(f"{server}/dashboard/login")
    page.goto(f"{server}/dashboard")
    page.wait_for_url(f"{server}/dashboard/login")
    assert context.cookies() == []
    context.close()


def test_a_wrong_key_stays_on_the_form(browser: Any, server: str) -> None:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server}/dashboard/login")
    page.fill("#api_key", "not-a-key")
    page.click("button[type=submit]")
    page.wait_for_selector("p.error")
    assert page.locator("p.error").text_content() == "That key was not accepted."
    assert page.context.cookies() == []
    page.goto(f"{server}/dashboard")
    page.wait_for_url(f"{server}/dashboard/login")
    page.close()
