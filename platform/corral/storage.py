"""Where jobs' artifacts live: one storage URI, the same for the API and every node.

Checkpoints and TensorBoard files (and later generated datasets) are written below the
storage root (`CORRAL_STORAGE_URI`): a directory every node mounts (by default
`CORRAL_HOME/checkpoints`, or an NFS path) or object storage (`s3://bucket/prefix`,
`gs://bucket/prefix`) through `pyarrow.fs`. The layout is the one `corral.tenancy`
spells: a job's directory is `ROOT/TENANT-SLUG/UUID`, so a tenant's own part is
`ROOT/TENANT-SLUG`.

Whether a location is a tenant's own is judged on the location as written, before
storage is asked anything, so the answer is the same whether or not something is stored
there: scheme, bucket and the path's components must match (no `..` or `.`, and no empty
component in object storage, where `a//b` and `a/b` are two different keys). A local path
must qualify as written and with its links resolved, so a link from a tenant's own
directory into another's is refused too.

Clients never see a storage URI: the spec's checkpoint `path` is a URL, `file://` for a
local root, and for S3 a presigned `https://` GET (signed with the server's credentials,
valid for `CORRAL_STORAGE_URL_EXPIRY_S`). A presigned URL names one object; a checkpoint
is a directory, so its URL is the presigned listing of that directory's keys (S3's
ListObjectsV2). For `gs://` the URL is Cloud Storage's authenticated `https://` address
(no signing library is installed; GCS's S3-compatible API with HMAC keys, as `s3://` with
`CORRAL_STORAGE_S3_ENDPOINT=https://storage.googleapis.com`, gives presigned URLs).
`location_of_url` maps each URL back to its location.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pyarrow.fs as pafs

from corral.errors import BackendUnavailable, InvalidRequest
from corral.tenancy import job_relative_dir, tenant_slug
from serve_apps.model_cache import StorageOptions, is_local, local_path, s3_filesystem


class StorageSettings(Protocol):
    """The settings a Storage is made from (`corral.config.Settings` has them; named here
    as a protocol so that this module, which the settings use to check the URI, does not
    import them back)."""

    @property
    def resolved_storage_uri(self) -> str: ...
    @property
    def storage_s3_endpoint(self) -> str | None: ...
    @property
    def storage_s3_region(self) -> str | None: ...
    @property
    def storage_url_expiry_s(self) -> int: ...


# Schemes with a client-facing URL (see the module docstring).
SCHEMES = ("file", "s3", "gs")
CONFIG_LIMIT = 1 << 20  # a model's config file larger than this is not one
GCS_URL = "https://storage.googleapis.com"


class InvalidLocation(ValueError):
    """A location that names nothing in storage: malformed, relative, with `..`, or on
    a scheme this server's storage is not."""


@dataclass(frozen=True)
class Location:
    """A normalized storage location: scheme, bucket (empty for `file`) and the path's
    components."""

    scheme: str
    bucket: str
    parts: tuple[str, ...]

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return PurePosixPath("/", *self.parts).as_uri()
        return f"{self.scheme}://{self.bucket}/{'/'.join(self.parts)}".rstrip("/")

    @property
    def key(self) -> str:
        """The object key (object storage) or the absolute path (file)."""
        joined = "/".join(self.parts)
        return f"/{joined}" if self.scheme == "file" else joined

    def child(self, *parts: str) -> Location:
        return Location(self.scheme, self.bucket, (*self.parts, *parts))

    def is_within(self, other: Location) -> bool:
        return (self.scheme, self.bucket) == (other.scheme, other.bucket) and self.parts[
            : len(other.parts)
        ] == other.parts


def parse_location(value: str) -> Location:
    """`value` (an absolute path, a `file://` URL or an object storage URI) normalized.
    Percent-escapes are decoded first, so `%2e%2e` is `..` and refused as such."""
    if not value or any(ord(c) < 32 or c == "\x7f" for c in value):
        raise InvalidLocation("a storage location must be non-empty printable text")
    if is_local(value):
        try:
            path = str(local_path(value))
        except ValueError as exc:
            raise InvalidLocation(str(exc)) from None
        split = urlsplit(value)
        if split.scheme == "file" and (split.query or split.fragment):
            raise InvalidLocation("a file URL of storage has no query or fragment")
        if not path.startswith("/"):
            raise InvalidLocation(f"{value[:300]!r} is not an absolute path")
        # POSIX reads `a//b` as `a/b`: empty components say nothing on a local disk.
        return Location("file", "", _checked_parts(path, allow_empty=True))
    split = urlsplit(value)
    if split.query or split.fragment:
        raise InvalidLocation("a storage URI has no query or fragment")
    if not split.netloc or any(c in split.netloc for c in "@:[]%"):
        raise InvalidLocation(f"{value[:300]!r} names no plain bucket")
    return Location(
        split.scheme.lower(), split.netloc, _checked_parts(unquote(split.path), allow_empty=False)
    )


def lies_within(value: str, own: Location) -> bool:
    """Whether `value` lies inside `own` (a tenant's or a job's own part of storage), as
    the module docstring says it is judged. InvalidLocation when `value` is malformed."""
    location = parse_location(value)
    if location.scheme != "file":
        return location.is_within(own)
    # The directory may itself be a link the operator made: either form counts.
    forms = (own, parse_location(os.path.realpath(own.key)))
    resolved = parse_location(os.path.realpath(location.key))
    return any(location.is_within(form) for form in forms) and any(
        resolved.is_within(form) for form in forms
    )


def _checked_parts(path: str, *, allow_empty: bool) -> tuple[str, ...]:
    parts = path.split("/")[1:] if path.startswith("/") else path.split("/")
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash: the directory itself
    if "." in parts or ".." in parts:
        raise InvalidLocation("a storage location may not contain '.' or '..' components")
    if "" in parts and not allow_empty:
        raise InvalidLocation("an object storage key may not contain an empty component")
    return tuple(part for part in parts if part)


class Storage:
    """The storage root, its layout, ownership checks, transfers and client URLs."""

    def __init__(
        self,
        root: str,
        *,
        options: StorageOptions | None = None,
        url_expiry_s: int = 3600,
    ) -> None:
        """`root`: a directory (made absolute here) or a URI on one of `SCHEMES`."""
        if is_local(root):
            root = str(Path(local_path(root)).expanduser().absolute())
        self.root = parse_location(root)
        if self.root.scheme not in SCHEMES:
            raise InvalidLocation(
                f"storage scheme {self.root.scheme!r} is not supported: use one of {SCHEMES}"
            )
        self.options = options or StorageOptions()
        self._expiry_s = url_expiry_s

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> Storage:
        return cls(
            settings.resolved_storage_uri,
            options=StorageOptions(
                s3_endpoint=settings.storage_s3_endpoint, s3_region=settings.storage_s3_region
            ),
            url_expiry_s=settings.storage_url_expiry_s,
        )

    @property
    def is_local(self) -> bool:
        return self.root.scheme == "file"

    @cached_property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem of the root (made on first use; it connects lazily)."""
        if self.root.scheme == "file":
            return pafs.LocalFileSystem()
        if self.root.scheme == "s3":
            return s3_filesystem(self.options)
        return pafs.FileSystem.from_uri(self.root.uri)[0]

    # ------------------------------------------------------------------ layout

    def tenant_location(self, tenant: str) -> Location:
        return self.root.child(tenant_slug(tenant))

    def job_uri(self, tenant: str, job_uuid: str) -> str:
        """Where a tenant's job writes (its `output_dir`): `ROOT/TENANT-SLUG/UUID`."""
        return self.root.child(*job_relative_dir(tenant, job_uuid).parts).uri

    def is_tenants(self, value: str, tenant: str) -> bool:
        """Whether `value` lies inside `tenant`'s own part of storage (see the module
        docstring). InvalidLocation when it is malformed."""
        return lies_within(value, self.tenant_location(tenant))

    def contains(self, value: str) -> bool:
        """Whether `value` lies below the storage root at all."""
        return parse_location(value).is_within(self.root)

    def checked_model_uri(self, value: str, field: str, required_file: str, *, tenant: str) -> str:
        """The storage URI of a model directory `tenant` may use: `value` is a storage URI
        or a URL `directory_url` gave, inside the tenant's own part, holding
        `required_file` as a readable JSON object (a model or adapter config).
        InvalidRequest otherwise; ownership is judged before storage is asked anything."""
        try:
            if urlsplit(value).scheme in ("http", "https"):
                uri = self.location_of_url(value)
            else:
                uri = parse_location(value).uri
            owned = self.is_tenants(uri, tenant)
        except InvalidLocation as exc:
            raise InvalidRequest(f"{field}: {exc}") from None
        if not owned:
            own = self.tenant_location(tenant).uri
            raise InvalidRequest(
                f"{field} must be a checkpoint of one of your own jobs (under {own})"
            )
        try:
            if not self.is_file(f"{uri}/{required_file}"):
                raise InvalidRequest(f"{field}: no {required_file} in {value[:300]!r}")
            data = self.read_bytes(f"{uri}/{required_file}", limit=CONFIG_LIMIT)
        except ValueError:
            data = b""
        except OSError as exc:
            raise BackendUnavailable(f"storage {self.root.uri} did not answer: {exc}") from None
        try:
            config = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            config = None
        if not isinstance(config, dict):
            raise InvalidRequest(f"{field}: {required_file} is not a readable JSON object")
        return uri

    # ------------------------------------------------------------------ files

    def _path(self, uri: str) -> str:
        location = parse_location(uri)
        if location.scheme != self.root.scheme:
            raise InvalidLocation(
                f"{uri[:300]!r} is not on this server's storage ({self.root.scheme})"
            )
        return location.key if location.scheme == "file" else f"{location.bucket}/{location.key}"

    def is_file(self, uri: str) -> bool:
        return bool(self.filesystem.get_file_info(self._path(uri)).type == pafs.FileType.File)

    def is_dir(self, uri: str) -> bool:
        info = self.filesystem.get_file_info(self._path(uri))
        return bool(info.type == pafs.FileType.Directory)

    def read_bytes(self, uri: str, *, limit: int) -> bytes:
        """The file's bytes; ValueError when it holds more than `limit`."""
        with self.filesystem.open_input_stream(self._path(uri)) as stream:
            data: bytes = stream.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{uri[:300]!r} holds more than {limit} bytes")
        return data

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write the file at `uri` whole: a reader sees the old file or the new one, never a
        part. On a directory the bytes go to a hidden temporary name beside it first, then
        are renamed over it (atomic on POSIX); in object storage an object appears whole
        once its upload completes."""
        path = self._path(uri)
        if not self.is_local:
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(data)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    def file_names(self, uri: str) -> list[str]:
        """The names of the files directly in the directory at `uri`, sorted; none when
        it does not exist. Hidden names (a local write under way) are left out."""
        selector = pafs.FileSelector(self._path(uri), allow_not_found=True)
        return sorted(
            PurePosixPath(info.path).name
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and not PurePosixPath(info.path).name.startswith(".")
        )

    def upload_dir(self, local_dir: Path, uri: str) -> None:
        """Copy a local directory's files to `uri` (a directory), replacing same names."""
        destination = self._path(uri)
        if self.is_local:
            if Path(destination) == local_dir.absolute():
                return  # written in place already
            Path(destination).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(str(local_dir), destination, destination_filesystem=self.filesystem)

    def download_dir(self, uri: str, local_dir: Path) -> None:
        """Copy every file under `uri` into `local_dir`."""
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self._path(uri), str(local_dir), source_filesystem=self.filesystem)

    def ray_train_storage(self, uri: str) -> tuple[str, pafs.FileSystem | None]:
        """Ray Train's `storage_path` and `storage_filesystem` for a run under `uri`: a
        local path with no filesystem, else the path inside this storage's filesystem
        (which carries the endpoint and region Ray would not know)."""
        path = self._path(uri)
        return (path, None) if self.is_local else (path, self.filesystem)

    # ------------------------------------------------------------------ client URLs

    def file_url(self, uri: str) -> str:
        """The URL a client fetches the file at `uri` from (see the module docstring)."""
        location = parse_location(uri)
        if location.scheme == "s3":
            return self._presigned("get_object", {"Bucket": location.bucket, "Key": location.key})
        return self._plain_url(location)

    def directory_url(self, uri: str) -> str:
        """The URL of the directory at `uri`: a `file://` URL, or for S3 the presigned
        listing of its keys."""
        location = parse_location(uri)
        if location.scheme == "s3":
            params = {"Bucket": location.bucket, "Prefix": f"{location.key}/"}
            return self._presigned("list_objects_v2", params)
        return self._plain_url(location)

    def location_of_url(self, url: str) -> str:
        """The storage URI behind a URL `file_url` or `directory_url` gave (or any
        `file://` URL when the root is local). InvalidLocation for any other URL. The
        signature is not checked: what the location may be used for is checked on it."""
        split = urlsplit(url)
        if split.scheme == "file":
            return parse_location(url).uri
        if split.scheme not in ("http", "https"):
            raise InvalidLocation(f"{url[:300]!r} is not a URL of this server's storage")
        if self.root.scheme == "s3":
            base = urlsplit(self._s3_client.meta.endpoint_url)
            prefix = parse_qs(split.query).get("prefix")
        elif self.root.scheme == "gs":
            base, prefix = urlsplit(GCS_URL), None
        else:
            raise InvalidLocation("this server's storage is local: its URLs are file:// URLs")
        bucket, _, key = unquote(split.path).removeprefix("/").partition("/")
        if (split.scheme, split.netloc) != (base.scheme, base.netloc) or not bucket:
            raise InvalidLocation(f"{url[:300]!r} is not a URL of this server's storage")
        if prefix is not None:  # a directory's listing
            if key or len(prefix) != 1:
                raise InvalidLocation(f"{url[:300]!r} is not a URL of this server's storage")
            key = prefix[0]
        return parse_location(f"{self.root.scheme}://{bucket}/{key}").uri

    def _plain_url(self, location: Location) -> str:
        if location.scheme == "file":
            return location.uri
        if location.scheme == "gs":
            return f"{GCS_URL}/{location.bucket}/{quote(location.key)}"
        raise InvalidLocation(f"no client URL for {location.scheme}:// locations")

    def _presigned(self, operation: str, params: dict[str, str]) -> str:
        url: str = self._s3_client.generate_presigned_url(
            operation, Params=params, ExpiresIn=self._expiry_s
        )
        return url

    @cached_property
    def _s3_client(self) -> Any:
        """boto3's client, for presigning only (pyarrow cannot presign): imported on first
        use, path-style so a URL maps back to its bucket and key the same way on every
        endpoint."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.options.s3_endpoint,
            region_name=self.options.s3_region or "us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
