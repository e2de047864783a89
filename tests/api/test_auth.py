"""Bearer keys guard every route when keys are configured, and nothing otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from corral.app import create_app
from corral.auth import BearerAuthMiddleware, tenant_for
from corral.config import DEFAULT_TENANT, ApiKey, Settings
from corral.deps import OperatorDep, TenantDep
from corral.sessions import COOKIE_NAME, SessionCookies
from corral.store.db import Database

KEYS = (ApiKey("alpha", "key-alpha"), ApiKey("beta", "key-beta"))


@pytest.mark.parametrize(
    ("header", "tenant"),
    [
        ("Bearer key-alpha", "alpha"),
        ("bearer key-beta", "beta"),
        ("Bearer  key-alpha ", "alpha"),
        ("Bearer wrong", None),
        ("Basic key-alpha", None),
        ("key-alpha", None),
        ("Bearer ", None),
        (None, None),
    ],
)
def test_tenant_for(header: str | None, tenant: str | None) -> None:
    assert tenant_for(KEYS, header) == tenant


@pytest.fixture
def sqlite_client(tmp_path: Path, sqlite_database: Database, request: pytest.FixtureRequest):
    keys = getattr(request, "param", "alpha:key-alpha")
    app = create_app(Settings(home=tmp_path, api_keys=keys), database=sqlite_database)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/datasets/get?dataset_id=x"),
        ("POST", "/datasets/create"),
        ("POST", "/inference/chat_completion"),
        ("GET", "/post_training/job/status?job_uuid=x"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/metrics"),
        ("GET", "/dashboard/session"),
        ("GET", "/jobs"),
    ],
)
def test_every_route_needs_a_key(sqlite_client: TestClient, method: str, path: str) -> None:
    response = sqlite_client.request(method, path, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"
    wrong = sqlite_client.request(method, path, json={}, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401


def test_a_valid_key_passes(sqlite_client: TestClient) -> None:
    response = sqlite_client.get(
        "/datasets/get", params={"dataset_id": "x"}, headers={"Authorization": "Bearer key-alpha"}
    )
    assert response.status_code == 404
    assert sqlite_client.get("/health").status_code == 200
    assert sqlite_client.get("/ready").status_code == 200  # probes carry no key


@pytest.mark.parametrize("sqlite_client", [""], indirect=True)
def test_without_keys_the_default_tenant_is_open(sqlite_client: TestClient) -> None:
    assert sqlite_client.get("/datasets/get", params={"dataset_id": "x"}).status_code == 404
    assert sqlite_client.get("/openapi.json").status_code == 200


def _whoami(settings: Settings) -> TestClient:
    """The middleware with the app's own keys, over one route that shows what it set."""
    app = FastAPI()
    app.add_middleware(BearerAuthMiddleware, keys=settings.bearer_keys)

    @app.get("/whoami")
    def whoami(tenant: TenantDep, operator: OperatorDep) -> dict[str, object]:
        return {"tenant": tenant, "operator": operator}

    return TestClient(app)


def test_operator_keys_act_as_their_tenant_and_are_marked(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, api_keys="alpha:key-alpha", operator_keys="ops:key-ops,key-root"
    )
    with _whoami(settings) as client:

        def caller(key: str) -> object:
            return client.get("/whoami", headers={"Authorization": f"Bearer {key}"}).json()

        assert caller("key-alpha") == {"tenant": "alpha", "operator": False}
        assert caller("key-ops") == {"tenant": "ops", "operator": True}
        assert caller("key-root") == {"tenant": DEFAULT_TENANT, "operator": True}
        assert client.get("/whoami").status_code == 401


def test_only_operator_keys_configured_still_require_a_key(tmp_path: Path) -> None:
    with _whoami(Settings(home=tmp_path, operator_keys="ops:key-ops")) as client:
        assert client.get("/whoami").status_code == 401


def test_without_any_keys_the_caller_is_the_default_tenant_and_an_operator(
    tmp_path: Path,
) -> None:
    with _whoami(Settings(home=tmp_path)) as client:
        assert client.get("/whoami").json() == {"tenant": DEFAULT_TENANT, "operator": True}


def test_the_dashboard_opens_only_its_sign_in_and_sends_browsers_there(
    sqlite_client: TestClient,
) -> None:
    for path in ("/dashboard/login", "/dashboard/static/dashboard.js"):
        assert sqlite_client.get(path).status_code == 200, path
    page = sqlite_client.get("/dashboard", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/dashboard/login"
    # Not a browser page: the usual 401.
    assert sqlite_client.post("/dashboard", follow_redirects=False).status_code == 401
    assert sqlite_client.get("/dashboard/", follow_redirects=False).status_code == 401


def test_a_session_cookie_never_makes_an_operator(tmp_path: Path) -> None:
    """The middleware, on a path the cookie may read, with an operator's session."""
    settings = Settings(home=tmp_path, operator_keys="ops:key-ops")
    sessions = SessionCookies.from_settings(settings)
    app = FastAPI()
    app.add_middleware(BearerAuthMiddleware, keys=settings.bearer_keys, sessions=sessions)

    @app.get("/dashboard/session")
    def whoami(tenant: TenantDep, operator: OperatorDep) -> dict[str, object]:
        return {"tenant": tenant, "operator": operator}

    cookie = {"Cookie": f"{COOKIE_NAME}={sessions.issue(settings.bearer_keys[0])}"}
    with TestClient(app) as client:
        answer = client.get("/dashboard/session", headers=cookie).json()
        assert answer == {"tenant": "ops", "operator": False}
        bearer = {"Authorization": "Bearer key-ops"}
        answer = client.get("/dashboard/session", headers=bearer).json()
        assert answer == {"tenant": "ops", "operator": True}
