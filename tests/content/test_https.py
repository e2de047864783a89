"""The fetcher's HTTPS path against a real TLS server on loopback, with CAs made here.

The SSRF guard connects to the IP it checked, never to the name again; these tests show
that TLS over that pinned connection still sends the host name as SNI and verifies the
certificate for the name (the test certificates name `localhost` only, no IP), through
the CA bundle the policy trusts, and refuses a certificate for another host, one from an
untrusted CA, and a redirect from a trusted server to a private address."""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from corral.app import fetch_policy
from corral.config import Settings
from corral.content import ContentFetcher, FetchPolicy
from corral.errors import ContentUnavailable

HOST = "localhost"
BODY = b'{"a": 1}\n'
# Loopback only for these tests: production policies never carry extra networks.
LOOPBACK = (ipaddress.IPv4Network("127.0.0.1/32"), ipaddress.IPv6Network("::1/128"))


@dataclass
class TLSServer:
    port: int
    server_names: list[str | None] = field(default_factory=list)  # SNI of each handshake
    hits: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)

    def url(self, path: str, host: str = HOST) -> str:
        return f"https://{host}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.state.hits.append((self.path, self.headers.get("Host", "")))
        if self.path.startswith("/redirect-private"):
            self.send_response(302)
            self.send_header("Location", "https://10.0.0.1/data.jsonl")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/jsonl")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


class _Server(ThreadingHTTPServer):
    state: TLSServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a refused handshake is the point of some tests


@pytest.fixture(scope="module")
def trusted_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_bundle(trusted_ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    trusted_ca.cert_pem.write_to_path(str(path))
    return path


def _serve(cert: trustme.LeafCert) -> Iterator[TLSServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    state = TLSServer(port=httpd.server_address[1])
    httpd.state = state

    def record_sni(_sock: Any, server_name: str | None, _context: Any) -> None:
        state.server_names.append(server_name)

    context.sni_callback = record_sni
    # The handshake runs in the handler thread, so a refused one never stalls accept().
    httpd.socket = context.wrap_socket(
        httpd.socket, server_side=True, do_handshake_on_connect=False
    )
    httpd.daemon_threads = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(trusted_ca: trustme.CA) -> Iterator[TLSServer]:
    """A server whose certificate, from the trusted CA, names `localhost` only."""
    yield from _serve(trusted_ca.issue_cert(HOST))


def _fetcher(ca_bundle: Path | None, **overrides: Any) -> ContentFetcher:
    values: dict[str, Any] = {
        "allowed_roots": (),
        "max_bytes": 1000,
        "timeout_s": 5.0,
        "ca_bundle": ca_bundle,
        "extra_allowed_networks": LOOPBACK,
    }
    return ContentFetcher(FetchPolicy(**(values | overrides)))


def test_https_through_the_pinned_address_sends_sni_and_verifies_the_name(
    server: TLSServer, ca_bundle: Path
) -> None:
    fetched = _fetcher(ca_bundle).fetch(server.url("/data.jsonl"))
    assert fetched.data == BODY
    assert fetched.media_type == "application/jsonl"
    assert fetched.name == "data.jsonl"
    # The guard connected to 127.0.0.1; the handshake still named the host.
    assert server.server_names == [HOST]
    assert server.hits == [("/data.jsonl", f"{HOST}:{server.port}")]


def test_the_bundle_comes_from_config(ca_bundle: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, fetch_ca_bundle=ca_bundle)
    assert fetch_policy(settings).ca_bundle == ca_bundle
    assert fetch_policy(Settings(home=tmp_path)).ca_bundle is None
    assert fetch_policy(settings).extra_allowed_networks == ()  # config never widens the guard


def test_a_missing_bundle_fails_when_the_fetcher_is_built(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _fetcher(tmp_path / "no-such-ca.pem")


def test_the_default_roots_do_not_trust_a_private_ca(server: TLSServer) -> None:
    with pytest.raises(ContentUnavailable, match="certificate that was not accepted"):
        _fetcher(None).fetch(server.url("/data.jsonl"))
    assert server.hits == []


def test_a_certificate_from_an_untrusted_ca_is_refused(server: TLSServer, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(ContentUnavailable, match="not accepted: unable to get local issuer"):
        _fetcher(other).fetch(server.url("/data.jsonl"))
    assert server.hits == []


def test_a_certificate_for_another_host_is_refused(trusted_ca: trustme.CA, ca_bundle: Path) -> None:
    for wrong in _serve(trusted_ca.issue_cert("files.example.org")):
        with pytest.raises(ContentUnavailable, match="not accepted: Hostname mismatch"):
            _fetcher(ca_bundle).fetch(wrong.url("/data.jsonl"))
        assert wrong.server_names == [HOST]  # it asked for localhost and got another name
        assert wrong.hits == []


def test_an_ip_url_is_checked_against_the_certificate_too(
    server: TLSServer, ca_bundle: Path
) -> None:
    # The certificate names localhost, not 127.0.0.1: connecting by address is no bypass.
    with pytest.raises(ContentUnavailable, match="not accepted: IP address mismatch"):
        _fetcher(ca_bundle).fetch(server.url("/data.jsonl", host="127.0.0.1"))
    assert server.hits == []


def test_a_trusted_server_cannot_redirect_to_a_private_address(
    server: TLSServer, ca_bundle: Path
) -> None:
    with pytest.raises(ContentUnavailable, match=r"10\.0\.0\.1.*not a public address"):
        _fetcher(ca_bundle).fetch(server.url("/redirect-private"))
    assert [path for path, _ in server.hits] == ["/redirect-private"]
