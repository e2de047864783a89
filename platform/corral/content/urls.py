"""Fetch dataset content from user-supplied URLs, under a policy that keeps the server safe.

Allowed: `data:` URLs, `file://` paths inside configured roots, and `https://` (plain
`http://` only when the policy says so) to globally routable addresses. The dataset roots
are shared by every tenant and partitioned by them: a tenant's fetches use
`ContentFetcher.within(tenant)`, whose only roots are the tenant's own directories
(`corral.tenancy.tenant_dir`) under each root. The address check
runs at connect time on the very IP the socket connects to, for every redirect hop, so a
name that resolves to a public address once and a private one later (DNS rebinding) gets
nowhere.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import mimetypes
import os
import socket
import ssl
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpcore
import httpx

from corral.errors import ContentUnavailable
from corral.tenancy import tenant_dir

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 8215 local-use NAT64 prefix: its embedded IPv4 addresses are translated privately.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_WELL_KNOWN_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may touch and how much of it; one policy is read from config and shared."""

    allowed_roots: tuple[Path, ...]
    max_bytes: int
    timeout_s: float
    allow_http: bool = False
    max_redirects: int = 5
    # PEM file of the CA certificates HTTPS fetches trust, in place of the default roots
    # (certifi's); e.g. a private CA in front of an internal dataset mirror. From config.
    ca_bundle: Path | None = None
    # Only for tests (e.g. 127.0.0.1/32 to reach a local test server): never from config.
    extra_allowed_networks: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("FetchPolicy needs max_bytes > 0, timeout_s > 0, max_redirects >= 0")


@dataclass(frozen=True)
class FetchedContent:
    data: bytes
    media_type: str | None
    name: str | None


def is_public_address(address: IPAddress) -> bool:
    """True for a globally routable unicast address, judged by any IPv4 address it embeds."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64 or address.is_site_local:
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _WELL_KNOWN_NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _address_allowed(address: IPAddress, extra: tuple[IPNetwork, ...]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # `in` does not compare versions itself: 127.0.0.1 would be "in" ::/0.
    if any(net.version == address.version and address in net for net in extra):
        return True
    return is_public_address(address)


def _resolve_allowed(host: str, port: int, extra: tuple[IPNetwork, ...]) -> list[IPAddress]:
    """Every address `host` resolves to, refusing the lot if any one is not allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ContentUnavailable(f"cannot resolve host {host!r}") from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]))
        if not _address_allowed(address, extra):
            raise ContentUnavailable(
                f"host {host!r} resolves to {address}, which is not a public address"
            )
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ContentUnavailable(f"cannot resolve host {host!r}")
    return addresses


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation ends by one wall-clock deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def _clamp(self, timeout: float | None, error: type[Exception]) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise error("deadline exceeded")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, self._clamp(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves the host itself, checks every address, and connects only to a checked IP.

    TLS still verifies against the hostname and sends it as SNI: httpcore passes the
    request's host as `server_hostname` to `start_tls`, not the address connected to.
    """

    def __init__(self, *, extra: tuple[IPNetwork, ...], deadline: float) -> None:
        self._inner = httpcore.SyncBackend()
        self._extra = extra
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = _resolve_allowed(host, port, self._extra)
        last_error: Exception | None = None
        for address in addresses:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise httpcore.ConnectTimeout("deadline exceeded")
            try:
                stream = self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=remaining if timeout is None else min(timeout, remaining),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        assert last_error is not None
        raise last_error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise ContentUnavailable("unix sockets are not allowed")


class ContentFetcher:
    """Fetches `data:`, `file://` and `https://` URLs under one `FetchPolicy`."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        # A path must lie under a root both as written and once resolved; a root may be
        # written either way (e.g. through a link the operator made).
        absolute = [root.expanduser().absolute() for root in policy.allowed_roots]
        self._roots = tuple(dict.fromkeys([*absolute, *(root.resolve() for root in absolute)]))
        # Built once, so a missing or malformed CA bundle fails at start-up, not per fetch.
        # Either way the context verifies the chain and the host name (CERT_REQUIRED).
        self._ssl_context = (
            ssl.create_default_context(cafile=str(policy.ca_bundle))
            if policy.ca_bundle is not None
            else httpcore.default_ssl_context()
        )

    @property
    def max_bytes(self) -> int:
        """The most bytes one dataset may hold, wherever it is read from."""
        return self._policy.max_bytes

    def within(self, tenant: str) -> ContentFetcher:
        """The same policy with `file://` confined to the tenant's own directory under each
        allowed root: a file of another tenant, or one at a root's top level, is refused
        exactly like a path outside every root, whether or not it exists."""
        roots = tuple(tenant_dir(root, tenant) for root in self._policy.allowed_roots)
        return ContentFetcher(replace(self._policy, allowed_roots=roots))

    def check(self, url: str) -> None:
        """Refuse `url` now if policy forbids it, without downloading anything."""
        scheme = self._scheme(url)
        if scheme == "data":
            self._fetch_data(url)
        elif scheme == "file":
            path = self._resolve_file(url)
            try:
                info = path.stat()
            except OSError as exc:
                raise ContentUnavailable("file is not accessible") from exc
            self._check_file_stat(info)
        else:
            parsed = self._parse_http_url(url)
            host = parsed.raw_host.decode("ascii")
            port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
            _resolve_allowed(host, port, self._policy.extra_allowed_networks)

    def fetch(self, url: str) -> FetchedContent:
        """Download `url` whole, or raise `ContentUnavailable` saying why not."""
        scheme = self._scheme(url)
        if scheme == "data":
            return self._fetch_data(url)
        if scheme == "file":
            return self._fetch_file(url)
        return self._fetch_http(url)

    # -- schemes ---------------------------------------------------------------------

    def _allowed_schemes(self) -> tuple[str, ...]:
        http = ("http",) if self._policy.allow_http else ()
        return ("https", *http, "data", "file")

    def _scheme(self, url: str) -> str:
        scheme, sep, _ = url.strip().partition(":")
        scheme = scheme.lower()
        allowed = self._allowed_schemes()
        if not sep or scheme not in allowed:
            listed = ", ".join(f"{name}:" for name in allowed)
            shown = scheme[:20] if sep else "(none)"
            raise ContentUnavailable(f"URL scheme {shown!r} is not allowed; use one of {listed}")
        return scheme

    def _check_size(self, size: int, what: str) -> None:
        if size > self._policy.max_bytes:
            raise ContentUnavailable(
                f"{what} is larger than the limit of {self._policy.max_bytes} bytes"
            )

    # -- data: -----------------------------------------------------------------------

    def _fetch_data(self, url: str) -> FetchedContent:
        _, _, rest = url.strip().partition(":")
        header, sep, payload = rest.partition(",")
        if not sep:
            raise ContentUnavailable("data: URL has no ',' before its content")
        params = header.split(";")
        is_base64 = len(params) > 1 and params[-1].strip().lower() == "base64"
        media_type = params[0].strip().lower()
        raw = unquote_to_bytes(payload)
        if is_base64:
            compact = b"".join(raw.split())
            # Decoding yields at least 3/4 of the text less padding: refuse too much early.
            self._check_size(len(compact) * 3 // 4 - 2, "data: URL content")
            try:
                data = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
            except binascii.Error as exc:
                raise ContentUnavailable("data: URL content is not valid base64") from exc
        else:
            data = raw
        self._check_size(len(data), "data: URL content")
        return FetchedContent(
            data=data, media_type=media_type if "/" in media_type else None, name=None
        )

    # -- file:// ---------------------------------------------------------------------

    def _resolve_file(self, url: str) -> Path:
        parts = urlsplit(url.strip())
        if parts.netloc not in ("", "localhost"):
            raise ContentUnavailable("file:// URLs may not name a host")
        if parts.query:
            raise ContentUnavailable("file:// URLs may not have a query")
        try:
            raw_path = unquote(parts.path, errors="strict")
        except UnicodeDecodeError as exc:
            raise ContentUnavailable("file:// URL path is not valid UTF-8") from exc
        if not raw_path.startswith("/") or "\x00" in raw_path:
            raise ContentUnavailable("file:// URL must name an absolute path")
        # Judge the path as written (`..` applied to the text, so nothing outside it is
        # looked up) before the file system is asked anything, then as resolved, and only
        # then ask whether it exists: the answer for a path outside the roots (another
        # tenant's directory included) never tells whether something is there.
        written = Path(os.path.normpath(raw_path))
        if not self._inside_roots(written):
            raise self._outside()
        try:
            path = written.resolve()
        except (OSError, RuntimeError) as exc:
            raise ContentUnavailable("file:// path cannot be resolved") from exc
        if not self._inside_roots(path):
            raise self._outside()
        if not path.exists():
            raise ContentUnavailable("file does not exist")
        return path

    def _inside_roots(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self._roots)

    def _outside(self) -> ContentUnavailable:
        """The one answer for every path outside the roots. It names the roots this
        fetcher reads (for a tenant, its own directories), so it says nothing of others."""
        if not self._policy.allowed_roots:
            return ContentUnavailable("file:// path is outside the allowed directories (none)")
        where = ", ".join(str(root) for root in self._policy.allowed_roots)
        return ContentUnavailable(
            f"file:// path is outside the allowed directories (file:// may read under {where})"
        )

    def _check_file_stat(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise ContentUnavailable("file:// path is not a regular file")
        self._check_size(info.st_size, "file")

    def _fetch_file(self, url: str) -> FetchedContent:
        path = self._resolve_file(url)
        try:
            fd = _open_without_symlinks(path)
        except OSError as exc:
            raise ContentUnavailable("file is not accessible") from exc
        try:
            self._check_file_stat(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(self._policy.max_bytes + 1)
        self._check_size(len(data), "file")
        name = PurePosixPath(unquote(urlsplit(url.strip()).path)).name or None
        media_type = mimetypes.guess_type(name)[0] if name else None
        return FetchedContent(data=data, media_type=media_type, name=name)

    # -- http(s):// ------------------------------------------------------------------

    def _parse_http_url(self, url: str) -> httpx.URL:
        try:
            parsed = httpx.URL(url.strip())
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise ContentUnavailable("URL is not a valid http(s) URL") from exc
        if parsed.scheme not in self._allowed_schemes() or parsed.scheme not in _DEFAULT_PORTS:
            allowed = "https:// or http://" if self._policy.allow_http else "https://"
            raise ContentUnavailable(f"redirect to a {parsed.scheme}: URL; only {allowed} allowed")
        if not parsed.raw_host:
            raise ContentUnavailable("URL has no host")
        return parsed

    def _fetch_http(self, url: str) -> FetchedContent:
        deadline = time.monotonic() + self._policy.timeout_s
        backend = _GuardedBackend(extra=self._policy.extra_allowed_networks, deadline=deadline)
        current = self._parse_http_url(url)
        with httpcore.ConnectionPool(
            ssl_context=self._ssl_context, network_backend=backend, retries=0
        ) as pool:
            for _hop in range(self._policy.max_redirects + 1):
                result = self._request(pool, current, deadline)
                if isinstance(result, FetchedContent):
                    return result
                current = result
        raise ContentUnavailable(f"more than {self._policy.max_redirects} redirects")

    def _request(
        self, pool: httpcore.ConnectionPool, url: httpx.URL, deadline: float
    ) -> FetchedContent | httpx.URL:
        """One hop: the content, or the URL a redirect points to."""
        where = _describe(url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ContentUnavailable(f"{where} took longer than {self._policy.timeout_s} s")
        target = httpcore.URL(
            scheme=url.raw_scheme,
            host=url.raw_host,
            port=url.port or _DEFAULT_PORTS[url.scheme],
            target=url.raw_path,
        )
        headers = [
            (b"Host", url.netloc),
            (b"Accept", b"*/*"),
            (b"Accept-Encoding", b"identity"),
            (b"User-Agent", b"corral-content-fetcher"),
        ]
        timeouts = dict.fromkeys(("connect", "read", "write", "pool"), remaining)
        try:
            with pool.stream(
                "GET", target, headers=headers, extensions={"timeout": timeouts}
            ) as resp:
                return self._read_response(resp, url, where)
        except httpcore.TimeoutException as exc:
            raise ContentUnavailable(
                f"{where} took longer than {self._policy.timeout_s} s"
            ) from exc
        except (httpcore.NetworkError, OSError) as exc:
            refused = _certificate_refusal(exc)
            if refused is not None:
                raise ContentUnavailable(
                    f"{where} presented a TLS certificate that was not accepted: {refused}"
                ) from exc
            raise ContentUnavailable(f"could not connect to {where}") from exc
        except (httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            raise ContentUnavailable(f"{where} did not answer with valid HTTP") from exc

    def _read_response(
        self, resp: httpcore.Response, url: httpx.URL, where: str
    ) -> FetchedContent | httpx.URL:
        headers = {name.lower(): value for name, value in resp.headers}
        if resp.status in _REDIRECT_STATUSES:
            location = headers.get(b"location")
            if location is None:
                raise ContentUnavailable(f"{where} answered HTTP {resp.status} with no Location")
            try:
                next_url = url.join(location.decode("latin-1"))
            except (httpx.InvalidURL, ValueError) as exc:
                raise ContentUnavailable(f"{where} redirected to an invalid URL") from exc
            return self._parse_http_url(str(next_url))
        if not 200 <= resp.status < 300:
            raise ContentUnavailable(f"{where} answered HTTP {resp.status}")
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):
            raise ContentUnavailable(f"{where} sent compressed content, which is not supported")
        declared = headers.get(b"content-length")
        if declared is not None and declared.strip().isdigit():
            self._check_size(int(declared), f"content from {where}")
        body = bytearray()
        for chunk in resp.iter_stream():
            body.extend(chunk)
            self._check_size(len(body), f"content from {where}")
        return FetchedContent(
            data=bytes(body),
            media_type=_media_type(headers.get(b"content-type")),
            name=PurePosixPath(unquote(url.path)).name or None,
        )


def _open_without_symlinks(path: Path) -> int:
    """Open an already-resolved path one component at a time, following no symlink.

    Closes the gap between resolving a path and opening it: if a component was swapped
    for a symlink in between, the open fails instead of leaving the allowed roots.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    parts = path.parts
    if len(parts) < 2:
        raise IsADirectoryError(str(path))
    fd = os.open(parts[0], flags | os.O_DIRECTORY)
    try:
        for part in parts[1:-1]:
            next_fd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        # O_NONBLOCK so a FIFO cannot hang the open; fstat then refuses it.
        return os.open(parts[-1], flags | getattr(os, "O_NONBLOCK", 0), dir_fd=fd)
    finally:
        os.close(fd)


def _certificate_refusal(exc: BaseException) -> str | None:
    """Why the server's certificate was refused (wrong host, unknown CA), if that is what
    ended the connection: httpcore raises its own error from the ssl module's."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or "certificate verify failed")
        seen = seen.__cause__ or seen.__context__
    return None


def _media_type(content_type: bytes | None) -> str | None:
    if content_type is None:
        return None
    value = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return value or None


def _describe(url: httpx.URL) -> str:
    """Scheme, host and port only: paths and queries may carry signed tokens."""
    return f"{url.scheme}://{url.netloc.decode('ascii', errors='replace')}"
