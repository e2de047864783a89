"""Dashboard session cookies (corral/sessions.py): signed, timed, naming a key's identity
but never the key; refused when tampered with, expired, signed with another secret, or
for a key no longer configured; the secret is made once, 0600, and kept."""

from __future__ import annotations

import base64
import os
import stat
import time
from pathlib import Path

import pytest

from corral.config import ApiKey, Settings
from corral.sessions import (
    COOKIE_NAME,
    SECRET_FILE,
    Session,
    SessionCookies,
    cookie_may_authenticate,
    is_open_dashboard_path,
)

ALPHA = ApiKey("alpha", "key-alpha-0123456789")
BETA = ApiKey("beta", "key-beta-0123456789")
OPS = ApiKey("ops", "key-ops-0123456789", operator=True)
SECRET = b"s" * 32


def cookies(
    keys: tuple[ApiKey, ...] = (ALPHA, BETA, OPS),
    *,
    secret: bytes | None = SECRET,
    clock: float | None = None,
    max_age_s: int = 3600,
    secret_path: Path | None = None,
) -> SessionCookies:
    return SessionCookies(
        keys=keys,
        max_age_s=max_age_s,
        secret=secret,
        secret_path=secret_path,
        clock=(lambda: clock) if clock is not None else time.time,
    )


def _payload(token: str) -> bytes:
    encoded = token.split(".")[0]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def test_a_cookie_names_the_tenant_and_a_fingerprint_never_the_key() -> None:
    token = cookies().issue(ALPHA)
    assert cookies().session_for(token) == Session(tenant="alpha")
    assert ALPHA.key not in token
    payload = _payload(token)
    assert b"alpha" in payload and ALPHA.key.encode() not in payload


def test_an_operator_key_signs_in_as_its_tenant_only() -> None:
    session = cookies().session_for(cookies().issue(OPS))
    assert session == Session(tenant="ops")
    assert not hasattr(session, "operator")


def test_a_tampered_cookie_is_refused() -> None:
    token = cookies().issue(ALPHA)
    payload, stamp, signature = token.split(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    assert cookies().session_for(f"{payload}.{stamp}.{flipped}") is None
    # Beta's payload under alpha's signature
    beta_payload = cookies().issue(BETA).split(".")[0]
    assert cookies().session_for(f"{beta_payload}.{stamp}.{signature}") is None
    for junk in ("", "x", "a.b.c", "...", token + "x", "é"):
        assert cookies().session_for(junk) is None


def test_an_expired_cookie_is_refused() -> None:
    now = time.time()
    token = cookies(clock=now - 3601).issue(ALPHA)
    assert cookies(clock=now).session_for(token) is None
    assert cookies(clock=now - 3500).session_for(token) == Session(tenant="alpha")


def test_another_secret_or_a_removed_key_ends_the_session() -> None:
    token = cookies().issue(ALPHA)
    assert cookies(secret=b"t" * 32).session_for(token) is None
    assert cookies(keys=(BETA,)).session_for(token) is None
    # The same tenant with a new key: the old key's sessions end too.
    assert cookies(keys=(ApiKey("alpha", "a-new-key-0123456789"),)).session_for(token) is None


def test_the_cookie_is_found_among_the_request_cookies() -> None:
    token = cookies().issue(BETA)
    header = f"other=1; {COOKIE_NAME}={token}; more=2"
    assert cookies().session_in(header) == Session(tenant="beta")
    assert cookies().session_in(None) is None
    assert cookies().session_in(f"{COOKIE_NAME}=") is None
    assert cookies().session_in(f"x{COOKIE_NAME}={token}") is None


@pytest.mark.parametrize(
    ("method", "path", "accepted"),
    [
        ("GET", "/dashboard", True),
        ("HEAD", "/dashboard", True),
        ("GET", "/dashboard/session", True),
        ("GET", "/jobs", True),
        ("GET", "/jobs/ft-1", True),
        ("GET", "/jobs/ft-1/logs", True),
        ("GET", "/jobs/ft-1/metrics", True),
        ("GET", "/post_training/job/artifacts", True),
        ("POST", "/jobs/ft-1/cancel", False),
        ("GET", "/jobs/ft-1/cancel", False),
        ("POST", "/jobs", False),
        ("PUT", "/jobs/ft-1", False),
        ("DELETE", "/jobs/ft-1", False),
        ("POST", "/dashboard", False),
        ("GET", "/post_training/job/status", False),
        ("GET", "/post_training/job", False),
        ("GET", "/models", False),
        ("GET", "/datasets/get", False),
        ("GET", "/openapi.json", False),
        ("GET", "/jobs/ft-1/metrics/x", False),
        ("GET", "/dashboardx", False),
    ],
)
def test_the_cookie_stands_in_only_for_safe_reads_of_the_page(
    method: str, path: str, accepted: bool
) -> None:
    assert cookie_may_authenticate(method, path) is accepted


def test_only_the_sign_in_sign_out_and_static_files_are_open() -> None:
    for path in ("/dashboard/login", "/dashboard/logout", "/dashboard/static/dashboard.js"):
        assert is_open_dashboard_path(path)
    for path in ("/dashboard", "/dashboard/session", "/dashboard/static/a/b", "/jobs"):
        assert not is_open_dashboard_path(path)


def test_the_secret_is_made_once_owner_only_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "home" / SECRET_FILE
    checking = cookies(secret=None, secret_path=path)
    assert checking.session_for("a.b.c") is None
    assert not path.exists(), "checking a cookie makes no secret"
    token = cookies(secret=None, secret_path=path).issue(ALPHA)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert len(first) >= 32
    # A second process (here: object) finds the same secret and accepts the cookie.
    assert cookies(secret=None, secret_path=path).session_for(token) == Session(tenant="alpha")
    cookies(secret=None, secret_path=path).issue(BETA)
    assert path.read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == [SECRET_FILE]


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / SECRET_FILE
    path.write_bytes(os.urandom(16).hex().encode() * 2)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        cookies(secret=None, secret_path=path).issue(ALPHA)


def test_the_secret_setting_wins_over_the_file(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, api_keys="alpha:key-alpha", session_secret="x" * 40)
    token = SessionCookies.from_settings(settings).issue(settings.bearer_keys[0])
    assert not (tmp_path / SECRET_FILE).exists()
    again = SessionCookies.from_settings(settings)
    assert again.session_for(token) == Session(tenant="alpha")
    with pytest.raises(ValueError):
        Settings(home=tmp_path, session_secret="too short")
    assert "x" * 40 not in repr(settings)
