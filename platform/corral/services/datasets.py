"""Datasets: registered by URL, checked once at creation, read row by row by the jobs.

A dataset's URL is read by the content fetcher (`data:`, `https://`, `file://` under the
dataset roots), or, when it names a file in job storage (corral.storage: the `file://`
URL of a file under a local root, or the `https://` URL `Storage.file_url` gave for
object storage), from storage, for its own tenant only: that is where generation jobs
write the datasets they register (jobs/sdg/job.py). Whose a location is, is judged as
written before storage is asked anything (`Storage.is_tenants`: no `..`, no link into
another tenant's part), so a refusal never tells whether a file is there.
"""

from __future__ import annotations

import json
import math
import mimetypes
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy.exc import IntegrityError

from corral.api.datasets import CreateDatasetRequest, Dataset
from corral.content import ContentFetcher, FetchedContent, parse_rows
from corral.content.rows import loads_bounded
from corral.errors import BackendUnavailable, Conflict, ContentUnavailable, InvalidRequest, NotFound
from corral.services.ids import check_id
from corral.storage import InvalidLocation, Storage
from corral.store.datasets import DatasetStore
from corral.store.db import Database
from corral.store.digest import request_digest

Row = dict[str, Any]
MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Dataset metadata key that names the content format when URL and media type do not.
FORMAT_KEY = "format"


class DatasetService:
    def __init__(
        self, *, database: Database, fetcher: ContentFetcher, storage: Storage | None = None
    ) -> None:
        """`storage`: job storage, whose files a dataset may name (see the module doc)."""
        self._db = database
        self._fetcher = fetcher
        self._storage = storage

    def create(self, *, tenant: str, request: CreateDatasetRequest) -> None:
        """Register a dataset after reading it once: the URL must be allowed and reachable
        and every row must carry the declared columns with values of the declared types.
        The same uuid with the same dataset is a no-op; with another dataset, a Conflict."""
        uuid = check_id(request.uuid, what="dataset uuid")
        body = request.dataset.model_dump(mode="json")
        digest = request_digest(body)
        with self._db.transaction() as session:
            existing = DatasetStore(session).get(tenant=tenant, uuid=uuid)
            if existing is not None:
                _same_or_conflict(uuid, existing.request_digest, digest)
                return

        # Network and parsing happen outside any transaction.
        rows = self.load_rows(request.dataset, tenant=tenant)

        try:
            with self._db.transaction() as session:
                DatasetStore(session).add(
                    tenant=tenant,
                    uuid=uuid,
                    columns=body["columns"],
                    content_url=body["content_url"],
                    metadata=body["metadata"],
                    request_digest=digest,
                    row_count=len(rows),
                )
        except IntegrityError:
            # A concurrent create of the same uuid committed first.
            with self._db.transaction() as session:
                existing = DatasetStore(session).get(tenant=tenant, uuid=uuid)
                if existing is None:
                    raise
                _same_or_conflict(uuid, existing.request_digest, digest)

    def get(self, *, tenant: str, dataset_id: str) -> Dataset:
        with self._db.transaction() as session:
            row = DatasetStore(session).get(tenant=tenant, uuid=dataset_id)
            if row is None:
                raise NotFound(f"no dataset {dataset_id!r}")
            return Dataset.model_validate(
                {"columns": row.columns, "content_url": row.content_url, "metadata": row.metadata_}
            )

    def delete(self, *, tenant: str, dataset_id: str) -> None:
        with self._db.transaction() as session:
            if not DatasetStore(session).delete(tenant=tenant, uuid=dataset_id):
                raise NotFound(f"no dataset {dataset_id!r}")

    def load_rows(self, dataset: Dataset, *, tenant: str) -> list[Row]:
        """Fetch and parse a dataset's rows and check them against its declared columns.
        A `file://` URL is read only inside the tenant's own directory of each dataset
        root (`ContentFetcher.within`), or of job storage."""
        declared = dataset.metadata.get(FORMAT_KEY)
        if declared is not None and not isinstance(declared, str):
            raise InvalidRequest(f"dataset metadata {FORMAT_KEY!r} must be a string")
        url = str(dataset.content_url)
        uri = self._storage_uri(url)
        if uri is None:
            content = self._fetcher.within(tenant).fetch(url)
        else:
            content = self._read_storage(uri, tenant=tenant)
        rows = parse_rows(content, declared_format=declared)
        if not rows:
            raise InvalidRequest("dataset has no rows")
        columns = {name: str(kind) for name, kind in dataset.columns.items()}
        if not columns:
            raise InvalidRequest("dataset declares no columns")
        for index, row in enumerate(rows):
            for name, kind in columns.items():
                if name not in row:
                    raise InvalidRequest(f"row {index} has no column {name!r}")
                problem = _type_problem(kind, row[name])
                if problem:
                    raise InvalidRequest(f"row {index}, column {name!r} ({kind}): {problem}")
        return rows

    def _storage_uri(self, url: str) -> str | None:
        """The storage location `url` names, or None when it names none (then it is the
        fetcher's to judge, `..` and all)."""
        if self._storage is None:
            return None
        try:
            uri = self._storage.location_of_url(url)
            return uri if self._storage.contains(uri) else None
        except InvalidLocation:
            return None

    def _read_storage(self, uri: str, *, tenant: str) -> FetchedContent:
        assert self._storage is not None
        if not self._storage.is_tenants(uri, tenant):
            own = self._storage.tenant_location(tenant).uri
            raise ContentUnavailable(
                f"the file is in job storage outside your own part of it (datasets in job "
                f"storage are read under {own})"
            )
        limit = self._fetcher.max_bytes
        try:
            if not self._storage.is_file(uri):
                raise ContentUnavailable("file does not exist")
            data = self._storage.read_bytes(uri, limit=limit)
        except ValueError:
            raise ContentUnavailable(f"file is larger than the limit of {limit} bytes") from None
        except OSError as exc:
            raise BackendUnavailable(f"job storage did not answer: {exc}") from None
        name = PurePosixPath(uri).name
        return FetchedContent(data=data, media_type=mimetypes.guess_type(name)[0], name=name)


def _same_or_conflict(uuid: str, stored_digest: str, digest: str) -> None:
    if stored_digest != digest:
        raise Conflict(f"dataset {uuid!r} already exists with a different definition")


def _type_problem(kind: str, value: Any) -> str | None:
    """Why `value` is not a `kind` column value, or None. CSV cells arrive as strings, so
    numbers, dialogs and JSON may be spelled as text."""
    if kind == "text":
        return None if isinstance(value, str) else "expected a string"
    if kind == "media":
        return None if isinstance(value, str) and value else "expected a non-empty URL string"
    if kind == "number":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return "expected a number"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "expected a number"
        return None if math.isfinite(value) else "expected a finite number"
    if kind == "json":
        if isinstance(value, str):
            try:
                loads_bounded(value)
            except json.JSONDecodeError:
                return "expected JSON"
            except ValueError as exc:
                return str(exc)
        return None
    if kind == "dialog":
        if isinstance(value, str):
            try:
                value = loads_bounded(value)
            except json.JSONDecodeError:
                return "expected a list of messages"
            except ValueError as exc:
                return str(exc)
        return _dialog_problem(value)
    return f"unknown column type {kind!r}"


def _dialog_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of messages"
    for position, message in enumerate(value):
        if not isinstance(message, Mapping):
            return f"message {position} is not an object"
        if message.get("role") not in MESSAGE_ROLES:
            return f"message {position} has no valid role ({', '.join(sorted(MESSAGE_ROLES))})"
        if "content" not in message:
            return f"message {position} has no content"
    return None
