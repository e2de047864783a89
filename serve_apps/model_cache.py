"""Model directories from a storage URI, on the machine that needs them.

A model may live in object storage (`s3://bucket/…`, `gs://…`) rather than on a disk every
node mounts: a fine-tuning job's checkpoint, written under the storage URI. transformers
loads only local directories, so a replica (or a training worker) downloads the directory
once into a node-local cache and loads it from there. A local path or `file://` URL is
used where it is, untouched.

A cache entry is named by the URI and a digest of what the listing says about every file
under it (relative path, size, modification time): a checkpoint written again under the
same URI gets a new entry rather than a stale one. Two replicas on one node asking at
once take turns on a lock file (`fcntl.flock`), so one downloads and the other finds the
entry done; a download goes to a private folder that is renamed into place, so a crash
halfway never leaves an entry that looks complete.

Credentials are never part of these options (they travel to replicas as plain data, which
Ray shows in its dashboard): S3 and GCS read the node's standard credential chain
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, a profile, an instance role; GCS's
application default credentials), which every node needs anyway.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, PlainValidator

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_AWS_DEFAULT_REGION = "us-east-1"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class StorageOptions(BaseModel):
    """How to reach the storage behind a URI, beyond what the URI says. Plain data: it
    travels to jobs and replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # An S3-compatible endpoint other than AWS's (MinIO, Ceph, a test server), as
    # `http(s)://host:port`; None means AWS.
    s3_endpoint: str | None = None
    s3_region: str | None = None


def is_local(location: str) -> bool:
    """True for a plain path or a `file://` URL; False for any other URI scheme."""
    scheme = urlsplit(location).scheme
    # A one-letter scheme is a Windows drive letter, never a URI.
    return scheme in ("", "file") or len(scheme) == 1


def local_path(location: str) -> Path:
    """The path a plain path or `file://` URL names. ValueError for any other URI."""
    if not is_local(location):
        raise ValueError(f"{location[:300]!r} is not a local path")
    parts = urlsplit(location)
    if parts.scheme != "file":
        return Path(location)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URL {location[:300]!r} names another host")
    return Path(unquote(parts.path))


def model_location(value: object) -> Path | str:
    """A model's location as configured: a local path (as a Path, `file://` URLs
    included) or a storage URI (kept as the string it is: a Path would fold `s3://b` into
    `s3:/b`)."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("a model location is a path or a storage URI")
    return local_path(value) if is_local(value) else value


ModelLocation = Annotated[Path | str, PlainValidator(model_location)]


def open_uri(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `uri` and the path inside it (`bucket/key` for object
    storage, an absolute path locally)."""
    # Imported here, not at the top: job configs import this module, and bench/gpu_check.py
    # runs them on a machine without pyarrow.
    import pyarrow.fs as pafs

    if is_local(uri):
        return pafs.LocalFileSystem(), str(local_path(uri))
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return s3_filesystem(options), f"{parts.netloc}{unquote(parts.path)}".rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem, path.rstrip("/")


def s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    """S3 (or an S3-compatible endpoint), with the node's standard credential chain."""
    import pyarrow.fs as pafs

    if options.s3_endpoint is None:
        return pafs.S3FileSystem(region=options.s3_region or _AWS_DEFAULT_REGION)
    endpoint = urlsplit(options.s3_endpoint)
    return pafs.S3FileSystem(
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme or "https",
        region=options.s3_region or _AWS_DEFAULT_REGION,
    )


def local_model_dir(
    location: Path | str, *, options: StorageOptions, cache_root: Path | None = None
) -> Path:
    """A local directory holding the model at `location`: the path itself when it is
    local, else the cache entry for it under `cache_root` (default
    `~/.cache/corral/models` on this node), downloaded first if this node has none yet.
    FileNotFoundError when nothing is stored there."""
    if isinstance(location, Path):
        return location
    if is_local(location):
        return local_path(location)
    import pyarrow.fs as pafs

    filesystem, path = open_uri(location, options)
    files = [
        info
        for info in filesystem.get_file_info(
            pafs.FileSelector(path, recursive=True, allow_not_found=True)
        )
        if info.type == pafs.FileType.File
    ]
    if not files:
        raise FileNotFoundError(f"no files under {location[:300]!r}")
    root = (cache_root or Path.home() / ".cache" / "corral" / "models").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / _entry_name(location, path, files)
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if entry.is_dir():
            return entry
        partial = entry.with_name(f"{entry.name}.partial-{uuid.uuid4().hex[:8]}")
        log.info("downloading %s into %s", location, entry)
        try:
            partial.mkdir()
            pafs.copy_files(path, str(partial), source_filesystem=filesystem)
            os.rename(partial, entry)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return entry


def _entry_name(location: str, path: str, files: list[pafs.FileInfo]) -> str:
    """`<last path component>-<digest of the URI and the listing>`: readable in `ls`,
    unique to this content at this URI."""
    digest = hashlib.sha256(location.encode())
    for info in sorted(files, key=lambda info: info.path):
        relative = info.path.removeprefix(path)
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        digest.update(f"\0{relative}\0{info.size}\0{mtime}".encode())
    name = _UNSAFE.sub("_", path.rstrip("/").rsplit("/", 1)[-1])[:64] or "model"
    return f"{name}-{digest.hexdigest()[:24]}"
