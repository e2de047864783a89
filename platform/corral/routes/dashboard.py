"""The jobs dashboard: its page, static files and sign-in (not part of the API document).
HTTP only: the page itself reads the job routes; sessions are `corral.sessions`'.

Every answer carries a strict Content-Security-Policy (scripts and styles from this
origin only, no inline script, no framing). Signing in and out accepts only a
same-origin form post, so another site can neither sign a browser in to its own key nor
out."""

from __future__ import annotations

import html
from importlib import resources
from typing import cast
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.auth import key_for
from corral.config import Settings
from corral.deps import TenantDep
from corral.sessions import COOKIE_NAME, LOGIN_PATH, SessionCookies

router = APIRouter(include_in_schema=False)

DASHBOARD_PATH = "/dashboard"
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it a browser sends `Origin: null` with the sign-in form.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
MAX_FORM_BYTES = 4096
MESSAGE_MARK = "<!--message-->"


def _asset(name: str) -> str:
    return resources.files("corral.dashboard").joinpath(name).read_text("utf-8")


def _page(name: str, *, status_code: int = 200, message: str | None = None) -> HTMLResponse:
    text = _asset(name)
    if message is not None:
        notice = f'<p class="error" role="alert">{html.escape(message)}</p>'
        text = text.replace(MESSAGE_MARK, notice)
    return HTMLResponse(text, status_code=status_code, headers=SECURITY_HEADERS)


def _redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303, headers=SECURITY_HEADERS)


def _settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def _sessions(request: Request) -> SessionCookies | None:
    return cast(SessionCookies | None, getattr(request.app.state, "sessions", None))


def _same_origin(request: Request) -> bool:
    """Whether a form post came from this server's own pages. Browsers send `Origin` on
    every POST (and `Sec-Fetch-Site`); a client that sends neither is not a browser on
    another site. Only the host is compared: a TLS-terminating proxy changes the scheme."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc.lower() == host.lower()


def _secure(request: Request) -> bool:
    return _settings(request).session_cookie_secure or request.url.scheme == "https"


async def _form_key(request: Request) -> str | None:
    """The one `api_key` field of a small url-encoded form, or None."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != (
        "application/x-www-form-urlencoded"
    ):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        fields = parse_qs(body.decode("latin-1"), max_num_fields=8, errors="strict")
    except (ValueError, UnicodeDecodeError):
        return None
    values = fields.get("api_key", [])
    return values[0] if len(values) == 1 and values[0].strip() else None


@router.get(DASHBOARD_PATH)
def dashboard() -> HTMLResponse:
    """The page (the auth middleware sends a browser without a session to sign in)."""
    return _page("index.html")


@router.get("/dashboard/session")
def session(request: Request, tenant: TenantDep) -> JSONResponse:
    """Who the page is signed in as, and whether signing in is needed at all."""
    body = {"tenant": tenant, "sign_in": bool(_settings(request).bearer_keys)}
    return JSONResponse(body, headers=SECURITY_HEADERS)


@router.get(LOGIN_PATH)
def login_form(request: Request) -> Response:
    if not _settings(request).bearer_keys:
        return _redirect(DASHBOARD_PATH)  # no keys, no sign-in: the page is open
    return _page("login.html")


@router.post(LOGIN_PATH)
async def login(request: Request) -> Response:
    """An API key in, a session cookie out; a wrong key sets nothing."""
    if not _same_origin(request):
        return _page("login.html", status_code=403, message="Sign in from this server's page.")
    keys = _settings(request).bearer_keys
    sessions = _sessions(request)
    if not keys or sessions is None:
        return _redirect(DASHBOARD_PATH)
    value = await _form_key(request)
    if value is None:
        return _page("login.html", status_code=400, message="Enter an API key.")
    key = key_for(keys, f"Bearer {value}")
    if key is None:
        return _page("login.html", status_code=401, message="That key was not accepted.")
    response = _redirect(DASHBOARD_PATH)
    response.set_cookie(
        COOKIE_NAME,
        sessions.issue(key),
        max_age=sessions.max_age_s,
        path="/",
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/dashboard/logout")
def logout(request: Request) -> Response:
    if not _same_origin(request):
        return _page("login.html", status_code=403, message="Sign out from this server's page.")
    response = _redirect(LOGIN_PATH)
    response.delete_cookie(
        COOKIE_NAME, path="/", secure=_secure(request), httponly=True, samesite="strict"
    )
    return response


@router.get("/dashboard/static/{name}")
def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise StarletteHTTPException(404, "no such dashboard file")
    headers = SECURITY_HEADERS | {"Cache-Control": "no-cache"}
    return Response(_asset(name), media_type=media_type, headers=headers)
