"""The jobs dashboard over HTTP: signing in sets a signed, HttpOnly, SameSite=Strict
cookie (Secure on https or when told) and a wrong key sets nothing; the cookie reads the
page's job routes for its own tenant only, never writes, never other routes, and stops
working when tampered with, expired, signed out of or its key is removed; the page and
its files carry a strict CSP and hold no inline script; with no keys the page is open."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from importlib import resources
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from corral.app import create_app
from corral.config import Settings
from corral.routes.dashboard import CONTENT_SECURITY_POLICY, STATIC_FILES
from corral.sessions import COOKIE_NAME, SECRET_FILE, SessionCookies
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from tests.api.conftest import ALPHA, API_KEYS, BETA

pytestmark = pytest.mark.integration

PAGES = ("index.html", "login.html")


def _settings(home: Path, **overrides: object) -> Settings:
    return Settings(home=home, api_keys=API_KEYS, **overrides)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def app_client(home: Path, sqlite_database: Database) -> Iterator[TestClient]:
    app = create_app(_settings(home), database=sqlite_database)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def jobs(sqlite_database: Database) -> dict[str, str]:
    """Alpha's running job with logs, a checkpoint and metrics; beta's job."""
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        for tenant, uuid in (("alpha", "ft-a"), ("beta", "ft-b")):
            store.create(
                job_uuid=uuid, tenant=tenant, kind=JobKind.SUPERVISED_FINE_TUNE, request={}
            )
            key = job_key(tenant, uuid)
            store.transition(key, to=JobStatus.RUNNING)
            store.append_log(key, f"{tenant} step 1", f"{tenant} step 2")
            store.add_checkpoint(key, iters=2, path=f"/srv/ckpt/{uuid}/2")
            store.record_metrics(key, step=1, epoch=0, values={"loss": 2.5})
            store.record_metrics(key, step=2, epoch=0, values={"loss": 2.0})
            store.record_metrics(key, step=2, values={"validation_loss": 2.2})
    return {"alpha": "ft-a", "beta": "ft-b"}


def _sign_in(client: TestClient, key: str, **headers: str) -> httpx.Response:
    return client.post(
        "/dashboard/login", data={"api_key": key}, headers=headers, follow_redirects=False
    )


def _cookie(response: httpx.Response) -> SimpleCookie:
    cookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


def _session_headers(client: TestClient, key: str) -> dict[str, str]:
    """A Cookie header for a session of `key`, with the client's own jar left empty."""
    response = _sign_in(client, key)
    assert response.status_code == 303, response.text
    client.cookies.clear()
    return {"Cookie": f"{COOKIE_NAME}={_cookie(response)[COOKIE_NAME].value}"}


def _attributes(set_cookie: str) -> set[str]:
    return {part.strip().lower() for part in set_cookie.split(";")[1:]}


# ------------------------------------------------------------------ signing in


def test_without_a_session_the_page_sends_the_browser_to_sign_in(app_client: TestClient) -> None:
    response = app_client.get("/dashboard", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/login"
    form = app_client.get("/dashboard/login")
    assert form.status_code == 200
    assert form.headers["content-type"].startswith("text/html")
    assert form.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert 'name="api_key"' in form.text and 'type="password"' in form.text


def test_a_good_key_sets_a_signed_strict_http_only_cookie_that_is_not_the_key(
    app_client: TestClient,
) -> None:
    response = _sign_in(app_client, "key-alpha")
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"
    set_cookie = response.headers["set-cookie"]
    assert set_cookie.startswith(f"{COOKIE_NAME}=")
    attributes = _attributes(set_cookie)
    assert {"httponly", "samesite=strict", "path=/", "max-age=28800"} <= attributes
    assert "secure" not in attributes  # plain http here
    assert "key-alpha" not in set_cookie
    # The jar now holds it: the page, and who it is signed in as.
    page = app_client.get("/dashboard")
    assert page.status_code == 200 and '<script src="/dashboard/static/dashboard.js"' in page.text
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert app_client.get("/dashboard/session").json() == {"tenant": "alpha", "sign_in": True}


def test_an_operator_key_signs_in_as_its_tenant(home: Path, sqlite_database: Database) -> None:
    settings = Settings(home=home, api_keys="alpha:key-alpha", operator_keys="ops:key-ops")
    with TestClient(create_app(settings, database=sqlite_database)) as client:
        assert _sign_in(client, "key-ops").status_code == 303
        assert client.get("/dashboard/session").json()["tenant"] == "ops"


def test_the_cookie_is_secure_on_https_and_when_the_setting_forces_it(
    home: Path, sqlite_database: Database
) -> None:
    plain = create_app(_settings(home), database=sqlite_database)
    with TestClient(plain, base_url="https://corral.example") as client:
        assert "secure" in _attributes(_sign_in(client, "key-alpha").headers["set-cookie"])
    forced = create_app(_settings(home, session_cookie_secure=True), database=sqlite_database)
    with TestClient(forced) as client:
        assert "secure" in _attributes(_sign_in(client, "key-alpha").headers["set-cookie"])


def test_the_expiry_comes_from_the_setting(home: Path, sqlite_database: Database) -> None:
    app = create_app(_settings(home, session_max_age_s=600), database=sqlite_database)
    with TestClient(app) as client:
        assert "max-age=600" in _attributes(_sign_in(client, "key-alpha").headers["set-cookie"])


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("api_key=wrong", "application/x-www-form-urlencoded", 401),
        ("api_key=Bearer%20key-alpha", "application/x-www-form-urlencoded", 401),
        ("api_key=", "application/x-www-form-urlencoded", 400),
        ("other=key-alpha", "application/x-www-form-urlencoded", 400),
        ("api_key=key-alpha&api_key=key-beta", "application/x-www-form-urlencoded", 400),
        ("api_key=%ff%fe", "application/x-www-form-urlencoded", 400),
        ('{"api_key": "key-alpha"}', "application/json", 400),
        ("api_key=key-alpha", "text/plain", 400),
        ("api_key=key-alpha&" + "x=1&" * 4000, "application/x-www-form-urlencoded", 400),
    ],
)
def test_a_wrong_key_or_a_bad_form_sets_nothing(
    app_client: TestClient, home: Path, body: str, content_type: str, status: int
) -> None:
    response = app_client.post(
        "/dashboard/login",
        content=body.encode(),
        headers={"Content-Type": content_type},
        follow_redirects=False,
    )
    assert response.status_code == status
    assert "set-cookie" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert 'role="alert"' in response.text
    assert app_client.get("/dashboard", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_a_sign_in_or_out_from_another_site_is_refused(
    app_client: TestClient, headers: dict[str, str]
) -> None:
    response = _sign_in(app_client, "key-alpha", **headers)
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    _sign_in(app_client, "key-alpha")
    out = app_client.post("/dashboard/logout", headers=headers, follow_redirects=False)
    assert out.status_code == 403 and "set-cookie" not in out.headers
    assert app_client.get("/dashboard").status_code == 200, "still signed in"


def test_a_same_origin_browser_post_signs_in(app_client: TestClient) -> None:
    response = _sign_in(
        app_client, "key-alpha", Origin="http://testserver", **{"Sec-Fetch-Site": "same-origin"}
    )
    assert response.status_code == 303 and "set-cookie" in response.headers


def test_sign_out_clears_the_cookie(app_client: TestClient) -> None:
    _sign_in(app_client, "key-alpha")
    assert app_client.get("/dashboard").status_code == 200
    response = app_client.post("/dashboard/logout", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/login"
    cleared = _cookie(response)[COOKIE_NAME]
    assert cleared.value == "" and cleared["max-age"] == "0"
    assert {"httponly", "samesite=strict", "path=/"} <= _attributes(response.headers["set-cookie"])
    assert app_client.get("/dashboard", follow_redirects=False).status_code == 303
    assert app_client.get("/jobs").status_code == 401


# ------------------------------------------------------------------ what the cookie reads


def test_the_cookie_reads_the_pages_job_routes_for_its_own_tenant(
    app_client: TestClient, jobs: dict[str, str]
) -> None:
    session = _session_headers(app_client, "key-alpha")
    mine, theirs = jobs["alpha"], jobs["beta"]
    listed = app_client.get("/jobs", headers=session)
    assert listed.status_code == 200
    assert [job["job_uuid"] for job in listed.json()["data"]] == [mine]
    for path in (f"/jobs/{mine}", f"/jobs/{mine}/logs", f"/jobs/{mine}/metrics"):
        assert app_client.get(path, headers=session).status_code == 200, path
    metrics = app_client.get(f"/jobs/{mine}/metrics", headers=session).json()["data"]
    assert [m["values"] for m in metrics] == [{"loss": 2.5}, {"loss": 2.0, "validation_loss": 2.2}]
    artifacts = app_client.get(
        "/post_training/job/artifacts", params={"job_uuid": mine}, headers=session
    )
    assert artifacts.json()["checkpoints"] == [{"iters": 2, "path": "file:///srv/ckpt/ft-a/2"}]
    # Beta's job answers exactly as a job nobody has.
    for template in ("/jobs/{}", "/jobs/{}/logs", "/jobs/{}/metrics"):
        foreign = app_client.get(template.format(theirs), headers=session)
        nobody = app_client.get(template.format("nobody"), headers=session)
        assert foreign.status_code == nobody.status_code == 404
        assert foreign.text.replace(theirs, "<id>") == nobody.text.replace("nobody", "<id>")
    foreign = app_client.get(
        "/post_training/job/artifacts", params={"job_uuid": theirs}, headers=session
    )
    assert foreign.status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/jobs/ft-a/cancel", {}),
        ("POST", "/post_training/job/cancel", {"json": {"job_uuid": "ft-a"}}),
        ("POST", "/post_training/supervised_fine_tune/", {"json": {}}),
        ("POST", "/datasets/create", {"json": {}}),
        ("DELETE", "/datasets/delete", {"params": {"dataset_id": "x"}}),
        ("GET", "/post_training/job/status", {"params": {"job_uuid": "ft-a"}}),
        ("GET", "/post_training/job/logs", {"params": {"job_uuid": "ft-a"}}),
        ("GET", "/datasets/get", {"params": {"dataset_id": "x"}}),
        ("GET", "/models", {}),
        ("GET", "/openapi.json", {}),
        ("POST", "/inference/chat_completion", {"json": {}}),
    ],
)
def test_the_cookie_never_writes_nor_reads_beyond_the_page(
    app_client: TestClient,
    jobs: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, object],
) -> None:
    session = _session_headers(app_client, "key-alpha")
    response = app_client.request(method, path, headers=session, **kwargs)
    assert response.status_code == 401, response.text
    job = app_client.get("/jobs/ft-a", headers=ALPHA).json()
    assert job["status"] == "running" and not job["stop_pending"]


def test_a_bearer_key_still_opens_the_page_and_wins_over_a_cookie(
    app_client: TestClient, jobs: dict[str, str]
) -> None:
    assert app_client.get("/dashboard", headers=ALPHA).status_code == 200
    session = _session_headers(app_client, "key-alpha")
    listed = app_client.get("/jobs", headers=session | BETA).json()["data"]
    assert [job["job_uuid"] for job in listed] == [jobs["beta"]]


def _tampered(token: str) -> list[str]:
    payload, stamp, signature = token.split(".")
    return [
        f"{payload}.{stamp}.{signature[:-2]}",
        f"{payload[:-1]}x.{stamp}.{signature}",
        f"{payload}.{stamp}x.{signature}",
        "eyJ0ZW5hbnQiOiJiZXRhIn0." + stamp + "." + signature,
        "key-alpha",
    ]


def test_tampered_expired_foreign_or_revoked_cookies_are_refused(
    app_client: TestClient, home: Path, sqlite_database: Database, jobs: dict[str, str]
) -> None:
    token = _session_headers(app_client, "key-alpha")["Cookie"].split("=", 1)[1]
    for bad in _tampered(token):
        cookie = {"Cookie": f"{COOKIE_NAME}={bad}"}
        assert app_client.get("/jobs", headers=cookie).status_code == 401, bad
        page = app_client.get("/dashboard", headers=cookie, follow_redirects=False)
        assert page.status_code == 303

    settings = _settings(home)
    aged = SessionCookies(
        keys=settings.bearer_keys,
        max_age_s=settings.session_max_age_s,
        secret_path=home / SECRET_FILE,  # the app's own secret
        clock=lambda: time.time() - settings.session_max_age_s - 5,
    )
    expired = {"Cookie": f"{COOKIE_NAME}={aged.issue(settings.bearer_keys[0])}"}
    assert app_client.get("/jobs", headers=expired).status_code == 401

    other_secret = SessionCookies(
        keys=settings.bearer_keys, max_age_s=600, secret=b"another secret of enough bytes!!"
    )
    forged = {"Cookie": f"{COOKIE_NAME}={other_secret.issue(settings.bearer_keys[0])}"}
    assert app_client.get("/jobs", headers=forged).status_code == 401

    # The same home and secret, but alpha's key is no longer configured.
    revoked = create_app(
        Settings(home=home, api_keys="alpha:a-new-key,beta:key-beta"), database=sqlite_database
    )
    with TestClient(revoked) as client:
        assert client.get("/jobs", headers={"Cookie": f"{COOKIE_NAME}={token}"}).status_code == 401
    # ... while an app with the same keys accepts it.
    with TestClient(create_app(settings, database=sqlite_database)) as client:
        assert client.get("/jobs", headers={"Cookie": f"{COOKIE_NAME}={token}"}).status_code == 200


def test_the_secret_is_made_once_in_home_owner_only(app_client: TestClient, home: Path) -> None:
    assert not (home / SECRET_FILE).exists()
    _sign_in(app_client, "key-alpha")
    assert (home / SECRET_FILE).stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ no keys: open


def test_without_keys_the_page_is_open_and_needs_no_sign_in(
    home: Path, sqlite_database: Database
) -> None:
    with TestClient(create_app(Settings(home=home), database=sqlite_database)) as client:
        assert client.get("/dashboard").status_code == 200
        assert client.get("/dashboard/session").json() == {"tenant": "default", "sign_in": False}
        login = client.get("/dashboard/login", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/dashboard"
        posted = _sign_in(client, "anything")
        assert posted.status_code == 303 and "set-cookie" not in posted.headers
        assert client.get("/jobs").status_code == 200
    assert not (home / SECRET_FILE).exists()


# ------------------------------------------------------------------ the files


@pytest.mark.parametrize("name", sorted(STATIC_FILES))
def test_static_files_are_served_with_their_type_and_policy(
    app_client: TestClient, name: str
) -> None:
    response = app_client.get(f"/dashboard/static/{name}")  # no credential needed
    assert response.status_code == 200
    assert response.headers["content-type"] == STATIC_FILES[name]
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/static/index.html",
        "/dashboard/static/__init__.py",
        "/dashboard/static/..%2Fapp.py",
        "/dashboard/static/../../app.py",
        "/dashboard/static/",
    ],
)
def test_nothing_else_is_served_as_a_static_file(app_client: TestClient, path: str) -> None:
    response = app_client.get(path, headers=ALPHA)
    assert response.status_code == 404, response.text
    assert "import" not in response.text


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.handlers: list[str] = []
        self.styles: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        if tag == "style":
            self.styles.append(tag)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        self.styles += [name for name, _ in attrs if name == "style"]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data)


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_hold_no_inline_script_handler_or_style(page: str) -> None:
    markup = _Markup()
    markup.feed(resources.files("corral.dashboard").joinpath(page).read_text("utf-8"))
    assert all(script.get("src", "").startswith("/dashboard/static/") for script in markup.scripts)
    assert markup.inline == [] and markup.handlers == [] and markup.styles == []


def test_the_script_writes_server_data_as_text_only() -> None:
    script = resources.files("corral.dashboard").joinpath("dashboard.js").read_text("utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert not re.search(r"new Function|setTimeout\(\s*['\"`]", script)
    assert "textContent" in script
