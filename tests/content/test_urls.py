"""ContentFetcher against real files, real data: URLs and a real HTTP server on loopback."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from corral.content import ContentFetcher, FetchedContent, FetchPolicy, is_public_address
from corral.errors import ContentUnavailable
from corral.tenancy import tenant_dir

LOOPBACK_ONLY = (ipaddress.IPv4Network("127.0.0.1/32"),)
BODY = b'{"a": 1}\n{"a": 2}\n'
SECRET = b"secret-body-text"


def policy(**overrides: Any) -> FetchPolicy:
    values: dict[str, Any] = {"allowed_roots": (), "max_bytes": 1000, "timeout_s": 5.0}
    values.update(overrides)
    return FetchPolicy(**values)


# -- a local HTTP server ---------------------------------------------------------------


@dataclass
class Server:
    port: int
    stop: threading.Event
    hits: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


class Handler(BaseHTTPRequestHandler):
    server: _TestServer
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        state.hits.append((self.path, self.headers.get("Host", "")))
        parts = urlsplit(self.path)
        route = getattr(
            self, "route_" + parts.path.strip("/").split("/")[0].replace("-", "_").replace(".", "_")
        )
        with contextlib.suppress(OSError):  # the client hung up on purpose (size cap, timeout)
            route(parts, state)

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        self.reply(status, b"", {"Location": location})

    def route_data_jsonl(self, parts: Any, state: Server) -> None:
        self.reply(200, BODY, {"Content-Type": "application/jsonl; charset=utf-8"})

    def route_hop(self, parts: Any, state: Server) -> None:
        left = int(parts.path.rsplit("/", 1)[1])
        self.redirect("/data.jsonl" if left == 0 else f"/hop/{left - 1}", 301 + left % 2)

    def route_loop(self, parts: Any, state: Server) -> None:
        self.redirect("/loop")

    def route_to(self, parts: Any, state: Server) -> None:
        self.redirect(parse_qs(parts.query)["url"][0])

    def route_missing(self, parts: Any, state: Server) -> None:
        self.reply(404, SECRET, {"Content-Type": "text/plain"})

    def route_big_honest(self, parts: Any, state: Server) -> None:
        self.reply(200, b"x" * 5000)

    def route_big_claim(self, parts: Any, state: Server) -> None:
        self.reply(200, b"x" * 10, {"Content-Length": str(10**12)})

    def route_big_no_length(self, parts: Any, state: Server) -> None:
        # HTTP/1.0 with no Content-Length: the body runs until the connection closes.
        self.send_response(200)
        self.end_headers()
        for _ in range(50):
            self.wfile.write(b"x" * 100)

    def route_big_chunked(self, parts: Any, state: Server) -> None:
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(50):
            self.wfile.write(b"64\r\n" + b"x" * 100 + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_slow_headers(self, parts: Any, state: Server) -> None:
        state.stop.wait(5)
        self.reply(200, b"late")

    def route_slow_body(self, parts: Any, state: Server) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            if state.stop.wait(0.1):
                return
            self.wfile.write(b"x")
            self.wfile.flush()


class _TestServer(ThreadingHTTPServer):
    state: Server

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = _TestServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = False  # server_close() then joins every handler thread
    httpd.state = Server(port=httpd.server_address[1], stop=threading.Event())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.state.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def local() -> ContentFetcher:
    """A fetcher that may reach 127.0.0.1 (and nothing else private) over plain http."""
    return ContentFetcher(policy(allow_http=True, extra_allowed_networks=LOOPBACK_ONLY))


def refused(fetcher: ContentFetcher, url: str, match: str) -> None:
    with pytest.raises(ContentUnavailable, match=match):
        fetcher.fetch(url)


# -- address policy --------------------------------------------------------------------

BLOCKED_URLS = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:a9fe:a9fe]/",  # 169.254.169.254, IPv4-mapped
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/",
    "http://172.16.5.4/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://198.18.0.1/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[fe80::1]/",
    "http://[fec0::1]/",
    "http://[ff02::1]/",
    "http://[2002:7f00:1::]/",  # 6to4 wrapping 127.0.0.1
    "http://[64:ff9b::a00:1]/",  # NAT64 wrapping 10.0.0.1
    "http://[64:ff9b:1::1]/",  # local-use NAT64
    "http://[::7f00:1]/",  # IPv4-compatible 127.0.0.1
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://017700000001/",
    "https://127.0.0.1:8443/",
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
def test_non_public_destinations_are_refused_by_check_and_fetch(url: str) -> None:
    fetcher = ContentFetcher(policy(allow_http=True))
    with pytest.raises(ContentUnavailable, match="not a public address"):
        fetcher.check(url)
    refused(fetcher, url, "not a public address")


@pytest.mark.parametrize("url", ["http://0177.0.0.1/", "http://127.0.0.1.:80/", "http://[0:0::1]/"])
def test_odd_spellings_never_get_through(url: str) -> None:
    fetcher = ContentFetcher(policy(allow_http=True))
    with pytest.raises(
        ContentUnavailable, match=r"not a public address|not a valid|cannot resolve"
    ):
        fetcher.check(url)
    refused(fetcher, url, "not a public address|not a valid|cannot resolve")


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d822::1", "64:ff9b::808:808"],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_check_passes_a_public_literal_without_connecting() -> None:
    fetcher = ContentFetcher(policy())
    fetcher.check("https://93.184.216.34/data.jsonl")
    fetcher.check("https://[2606:4700:4700::1111]:8443/x.csv")


def test_extra_networks_do_not_leak_across_ip_versions() -> None:
    fetcher = ContentFetcher(
        policy(allow_http=True, extra_allowed_networks=(ipaddress.IPv6Network("::/0"),))
    )
    with pytest.raises(ContentUnavailable, match="not a public address"):
        fetcher.check("http://127.0.0.1/")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/data.csv",
        "gopher://example.com/",
        "javascript:alert(1)",
        "jar:file:///x.jar!/a",
        "dict://127.0.0.1:11211/",
        "/etc/passwd",
        "no scheme at all",
        "http://example.com/",  # plain http is off by default
    ],
)
def test_other_schemes_are_refused(url: str) -> None:
    fetcher = ContentFetcher(policy())
    with pytest.raises(ContentUnavailable, match="not allowed"):
        fetcher.check(url)
    refused(fetcher, url, "not allowed")


# -- data: -----------------------------------------------------------------------------


def test_data_url_base64() -> None:
    encoded = base64.b64encode(BODY).decode()
    got = ContentFetcher(policy()).fetch(f"data:application/jsonl;base64,{encoded}")
    assert got == FetchedContent(data=BODY, media_type="application/jsonl", name=None)


def test_data_url_base64_tolerates_whitespace_and_percent_escapes() -> None:
    encoded = base64.b64encode(b"\xfb\xff\xfe" * 10).decode()
    wrapped = quote(encoded[:20]) + "\n" + quote(encoded[20:], safe="")
    assert ContentFetcher(policy()).fetch(f"data:;base64,{wrapped}").data == b"\xfb\xff\xfe" * 10


def test_data_url_percent_encoded() -> None:
    got = ContentFetcher(policy()).fetch("data:text/csv;charset=utf-8,a%2Cb%0A1%2C%C3%A9%0A")
    assert got == FetchedContent(data="a,b\n1,é\n".encode(), media_type="text/csv", name=None)


@pytest.mark.parametrize("base64_encoded", [True, False])
def test_data_url_over_the_size_cap(base64_encoded: bool) -> None:
    fetcher = ContentFetcher(policy(max_bytes=100))
    payload = b"x" * 101
    url = (
        f"data:;base64,{base64.b64encode(payload).decode()}"
        if base64_encoded
        else f"data:,{payload.decode()}"
    )
    refused(fetcher, url, "larger than the limit of 100 bytes")
    exact = payload[:100]
    small = (
        f"data:;base64,{base64.b64encode(exact).decode()}"
        if base64_encoded
        else f"data:,{'x' * 100}"
    )
    assert fetcher.fetch(small).data == exact


@pytest.mark.parametrize(
    ("url", "match"),
    [("data:;base64,!!!notbase64", "not valid base64"), ("data:text/plain", "no ','")],
)
def test_malformed_data_urls(url: str, match: str) -> None:
    refused(ContentFetcher(policy()), url, match)


# -- file:// ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "rows.csv").write_bytes(b"a,b\n1,2\n")
    (root / "with space.jsonl").write_bytes(BODY)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    return {"root": root, "outside": outside}


def file_url(path: Path | str) -> str:
    return "file://" + quote(str(path))


def test_file_inside_root(tree: dict[str, Path]) -> None:
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],)))
    url = file_url(tree["root"] / "sub" / "rows.csv")
    fetcher.check(url)
    assert fetcher.fetch(url) == FetchedContent(
        data=b"a,b\n1,2\n", media_type="text/csv", name="rows.csv"
    )


def test_file_url_forms(tree: dict[str, Path]) -> None:
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],)))
    path = tree["root"] / "with space.jsonl"
    assert "%20" in file_url(path)
    for url in (file_url(path), "file://localhost" + quote(str(path)), "file:" + quote(str(path))):
        got = fetcher.fetch(url)
        assert (got.data, got.name) == (BODY, "with space.jsonl")


def test_symlink_inside_root_is_followed(tree: dict[str, Path]) -> None:
    link = tree["root"] / "alias.csv"
    link.symlink_to(tree["root"] / "sub" / "rows.csv")
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],)))
    assert fetcher.fetch(file_url(link)).data == b"a,b\n1,2\n"


@pytest.mark.parametrize(
    "make_url",
    [
        lambda t: file_url(t["outside"] / "secret.txt"),
        lambda t: file_url(t["outside"] / "does-not-exist.txt"),  # same answer: no oracle
        lambda t: file_url(t["root"]) + "/../outside/secret.txt",
        lambda t: file_url(t["root"]) + "/sub/%2e%2e/%2e%2e/outside/secret.txt",
        lambda t: "file:///etc/passwd",
    ],
)
def test_files_outside_the_roots_are_refused(tree: dict[str, Path], make_url: Any) -> None:
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],)))
    url = make_url(tree)
    with pytest.raises(ContentUnavailable, match="outside the allowed directories") as caught:
        fetcher.check(url)
    refused(fetcher, url, "outside the allowed directories")
    assert SECRET.decode() not in str(caught.value)


def test_symlink_escaping_the_root_is_refused(tree: dict[str, Path]) -> None:
    (tree["root"] / "escape.txt").symlink_to(tree["outside"] / "secret.txt")
    (tree["root"] / "escape-dir").symlink_to(tree["outside"])
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],)))
    refused(fetcher, file_url(tree["root"] / "escape.txt"), "outside the allowed")
    refused(fetcher, file_url(tree["root"] / "escape-dir" / "secret.txt"), "outside the allowed")


def test_a_tenants_fetcher_reads_only_its_own_directory(tree: dict[str, Path]) -> None:
    own = tenant_dir(tree["root"], "alpha")
    other = tenant_dir(tree["root"], "beta")
    for directory in (own, other):
        directory.mkdir()
        (directory / "rows.csv").write_bytes(b"a\n1\n")
    (own / "theirs.csv").symlink_to(other / "rows.csv")
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],))).within("alpha")
    assert fetcher.fetch(file_url(own / "rows.csv")).data == b"a\n1\n"
    answers = set()
    for path in (
        other / "rows.csv",
        other / "nothing.csv",  # the same answer: no oracle for another tenant's files
        own / "theirs.csv",
        tree["root"] / "sub" / "rows.csv",  # the shared top level is nobody's
        f"{own}/../{other.name}/rows.csv",
    ):
        with pytest.raises(ContentUnavailable, match="outside the allowed directories") as caught:
            fetcher.fetch(file_url(path))
        answers.add(caught.value.message)
    (answer,) = answers
    assert str(own) in answer and other.name not in answer


@pytest.mark.parametrize(
    ("make_url", "match"),
    [
        (lambda t: file_url(t["root"] / "nope.csv"), "does not exist"),
        (lambda t: file_url(t["root"] / "sub"), "not a regular file"),
        (lambda t: "file://evil.example.com" + quote(str(t["root"] / "sub" / "rows.csv")), "host"),
        (lambda t: "file:relative/rows.csv", "absolute path"),
        (lambda t: file_url(t["root"] / "sub" / "rows.csv") + "?x=1", "query"),
    ],
)
def test_bad_file_urls(tree: dict[str, Path], make_url: Any, match: str) -> None:
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],)))
    url = make_url(tree)
    with pytest.raises(ContentUnavailable, match=match):
        fetcher.check(url)
    refused(fetcher, url, match)


def test_fifo_is_refused_without_blocking(tree: dict[str, Path]) -> None:
    fifo = tree["root"] / "pipe.jsonl"
    os.mkfifo(fifo)
    refused(ContentFetcher(policy(allowed_roots=(tree["root"],))), file_url(fifo), "regular file")


def test_file_over_the_size_cap(tree: dict[str, Path]) -> None:
    (tree["root"] / "big.csv").write_bytes(b"x" * 101)
    fetcher = ContentFetcher(policy(allowed_roots=(tree["root"],), max_bytes=100))
    with pytest.raises(ContentUnavailable, match="larger than the limit"):
        fetcher.check(file_url(tree["root"] / "big.csv"))
    refused(fetcher, file_url(tree["root"] / "big.csv"), "larger than the limit")


# -- http(s):// against a local server ---------------------------------------------------


def test_fetch_over_http(server: Server, local: ContentFetcher) -> None:
    local.check(server.url("/data.jsonl"))
    got = local.fetch(server.url("/data.jsonl"))
    assert got == FetchedContent(data=BODY, media_type="application/jsonl", name="data.jsonl")


def test_the_guard_is_on_by_default(server: Server) -> None:
    fetcher = ContentFetcher(policy(allow_http=True))
    refused(fetcher, server.url("/data.jsonl"), "not a public address")
    refused(fetcher, server.url("/data.jsonl", host="localhost"), "not a public address")
    assert server.hits == []


def test_redirect_chain(server: Server, local: ContentFetcher) -> None:
    got = local.fetch(server.url("/hop/3"))
    assert (got.data, got.name) == (BODY, "data.jsonl")
    assert [path for path, _ in server.hits] == [
        "/hop/3",
        "/hop/2",
        "/hop/1",
        "/hop/0",
        "/data.jsonl",
    ]


def test_too_many_redirects(server: Server) -> None:
    fetcher = ContentFetcher(
        policy(allow_http=True, extra_allowed_networks=LOOPBACK_ONLY, max_redirects=3)
    )
    assert fetcher.fetch(server.url("/hop/2")).data == BODY
    refused(fetcher, server.url("/hop/3"), "more than 3 redirects")
    refused(fetcher, server.url("/loop"), "more than 3 redirects")


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("http://127.0.0.2:{port}/data.jsonl", "not a public address"),
        ("http://[::1]:{port}/data.jsonl", "not a public address"),
        ("http://169.254.169.254/latest/meta-data/", "not a public address"),
        ("http://2130706434:{port}/data.jsonl", "not a public address"),  # 127.0.0.2
        ("file:///etc/passwd", "only https:// or http:// allowed"),
        ("data:,hello", "only https:// or http:// allowed"),
    ],
)
def test_redirect_to_a_blocked_destination(
    server: Server, local: ContentFetcher, target: str, match: str
) -> None:
    url = server.url("/to?url=" + quote(target.format(port=server.port), safe=""))
    refused(local, url, match)
    assert len(server.hits) == 1


def test_http_to_https_only_policy_refuses_downgrade(server: Server) -> None:
    # With http off, an http hop is refused whether it comes first or from a redirect.
    fetcher = ContentFetcher(policy(extra_allowed_networks=LOOPBACK_ONLY))
    refused(fetcher, server.url("/data.jsonl"), "not allowed")
    assert server.hits == []


@pytest.mark.parametrize("path", ["/big-honest", "/big-claim", "/big-no-length", "/big-chunked"])
def test_body_over_the_size_cap(server: Server, local: ContentFetcher, path: str) -> None:
    refused(local, server.url(path), "larger than the limit of 1000 bytes")


def test_404_names_the_status_not_the_body(server: Server, local: ContentFetcher) -> None:
    with pytest.raises(ContentUnavailable, match="HTTP 404") as caught:
        local.fetch(server.url("/missing?token=s3cr3t"))
    assert SECRET.decode() not in caught.value.message
    assert "s3cr3t" not in caught.value.message


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
def test_slow_server_hits_the_total_timeout(server: Server, path: str) -> None:
    fetcher = ContentFetcher(
        policy(allow_http=True, extra_allowed_networks=LOOPBACK_ONLY, timeout_s=0.8)
    )
    started = time.monotonic()
    refused(fetcher, server.url(path), "took longer than 0.8 s")
    assert time.monotonic() - started < 2.0


# -- the address check happens on the IP actually connected to ---------------------------


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names under .test answer from this table: one answer per lookup, the last repeats;
    an answer of "a,b" gives both addresses."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            queue = answers[host]
            answer = queue.pop(0) if len(queue) > 1 else queue[0]
            return [info for a in answer.split(",") for info in real(a, port, *args, **kwargs)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_dns_rebinding_is_caught_at_connect_time(server: Server, fake_dns: Any) -> None:
    fake_dns["rebind.test"] = ["93.184.216.34", "127.0.0.1"]
    fetcher = ContentFetcher(policy(allow_http=True))
    url = f"http://rebind.test:{server.port}/data.jsonl"
    fetcher.check(url)  # the first answer is public
    refused(fetcher, url, "resolves to 127.0.0.1, which is not a public address")
    assert server.hits == []


def test_connects_to_the_checked_ip_and_keeps_the_hostname(server: Server, fake_dns: Any) -> None:
    fake_dns["pinned.test"] = ["127.0.0.1"]
    fetcher = ContentFetcher(policy(allow_http=True, extra_allowed_networks=LOOPBACK_ONLY))
    assert fetcher.fetch(f"http://pinned.test:{server.port}/data.jsonl").data == BODY
    assert server.hits == [("/data.jsonl", f"pinned.test:{server.port}")]


def test_any_blocked_address_among_several_refuses_the_host(fake_dns: Any) -> None:
    fake_dns["mixed.test"] = ["93.184.216.34", "93.184.216.34,10.0.0.1"]
    fetcher = ContentFetcher(policy())
    fetcher.check("https://mixed.test/")
    with pytest.raises(ContentUnavailable, match=r"10\.0\.0\.1"):
        fetcher.check("https://mixed.test/")
