"""Where memory bank chunks live: the `VectorIndex` protocol, and below it its pymilvus
implementation `MilvusIndex`.

A bank is one collection (its name chosen by Corral, never by a user): each chunk carries
its text (BM25 is computed by Milvus from it), its dense embedding, the uuid of its
document, its character offsets in the document's decoded text, and the document's
metadata. Searches fuse dense and BM25 keyword rankings by reciprocal rank."""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import grpc
from pymilvus import (
    AnnSearchRequest,
    CollectionSchema,
    DataType,
    Function,
    FunctionType,
    MilvusClient,
    RRFRanker,
)
from pymilvus.exceptions import ConnectError, MilvusException, MilvusUnavailableException
from pymilvus.milvus_client import IndexParams

from corral.errors import BackendUnavailable, InvalidRequest
from corral.milvus_client import open_client

if TYPE_CHECKING:
    from corral.config import Settings

# Metadata filters are data, never a Milvus expression a user writes: each key must equal
# its value (or be one of a list of values), all keys together (AND). Keys are plain
# identifiers; values JSON scalars. The client builds the expression with escaping.
FilterScalar = str | int | float | bool
MetadataFilter = dict[str, FilterScalar | list[FilterScalar]]
SearchMode = Literal["hybrid", "dense", "keyword"]
# Reciprocal-rank fusion constant (Cormack et al. use 60; so does Milvus's RRFRanker).
RRF_K = 60


@dataclass(frozen=True)
class ChunkRecord:
    chunk_id: str  # unique in its collection: f"{document_uuid}:{version}:{index}"
    document_uuid: str
    text: str
    start: int  # [start, end) character offsets in the document's decoded text
    end: int
    embedding: list[float]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkHit:
    chunk_id: str
    document_uuid: str
    text: str
    start: int
    end: int
    metadata: dict[str, Any]
    score: float  # higher is better; RRF score for hybrid search


class VectorIndex(Protocol):
    """One bank per collection. Every method is idempotent where that makes sense
    (creating an existing collection, dropping a missing one, deleting missing ids)."""

    def create_collection(self, name: str, *, dimension: int) -> None: ...

    def drop_collection(self, name: str) -> None: ...

    def has_collection(self, name: str) -> bool: ...

    def insert(self, name: str, chunks: Sequence[ChunkRecord]) -> None: ...

    def delete_chunks(self, name: str, chunk_ids: Sequence[str]) -> None: ...

    def delete_documents(self, name: str, document_uuids: Sequence[str]) -> None: ...

    def chunk_ids(self, name: str, document_uuid: str) -> list[str]:
        """Every chunk id stored for one document (to remove an old version's chunks)."""
        ...

    def search(
        self,
        name: str,
        *,
        text: str,
        embedding: Sequence[float],
        top_k: int,
        metadata_filter: MetadataFilter | None = None,
        mode: SearchMode = "hybrid",
    ) -> list[ChunkHit]:
        """The best `top_k` chunks, best first: dense cosine, BM25 over `text`, or both
        fused by reciprocal rank (`RRF_K`)."""
        ...


# -- the pymilvus implementation ----------------------------------------------------------

# Milvus's own limits: VARCHAR max_length is in UTF-8 bytes and at most 65535; a query or
# search returns at most 16384 rows (offset + limit). Chunks are validated against these
# before anything is written, so an over-long chunk is a clear 4xx, not half a document.
MAX_TEXT_BYTES = 65_535
MAX_ID_BYTES = 512
MAX_METADATA_BYTES = 65_536
MAX_RESULT_ROWS = 16_384
INSERT_BATCH = 256
DELETE_BATCH = 1_000
# Each ranking that hybrid search fuses brings this many candidates per requested hit, so
# a chunk ranked moderately in both lists can still win (RRF needs more than top_k each).
HYBRID_CANDIDATES_PER_HIT = 3
MIN_HYBRID_CANDIDATES = 20
MAX_FILTER_VALUES = 100

_FILTER_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_INT64 = (-(2**63), 2**63 - 1)
_OUTPUT_FIELDS = ["chunk_id", "document_uuid", "text", "start", "end", "metadata"]


class InvalidChunks(InvalidRequest, ValueError):
    """Chunks or a filter that Milvus cannot store or evaluate as given; nothing was written."""


def filter_expression(metadata_filter: MetadataFilter | None) -> str:
    """The Milvus boolean expression for a metadata filter (empty string: no filter).

    Keys must be plain identifiers; values are JSON scalars written as literals by
    `json.dumps`, which escapes quotes and backslashes. Strings may hold no control
    characters other than tab, newline and carriage return: those three are the only
    escapes both Milvus and Milvus Lite read besides quote and backslash."""
    if not metadata_filter:
        return ""
    clauses = []
    for key, value in metadata_filter.items():
        if not isinstance(key, str) or not _FILTER_KEY.match(key):
            raise InvalidChunks(
                f"metadata filter key {key!r} is not an identifier "
                "(letters, digits and underscores, at most 64, not starting with a digit)"
            )
        field = f'metadata["{key}"]'
        if isinstance(value, list):
            if not value:
                raise InvalidChunks(f"metadata filter {key!r}: an empty list matches nothing")
            if len(value) > MAX_FILTER_VALUES:
                raise InvalidChunks(
                    f"metadata filter {key!r}: at most {MAX_FILTER_VALUES} values in a list"
                )
            # `metadata["k"] in [...]` is Milvus syntax that Milvus Lite does not parse (it
            # takes only a plain field left of `in`); ORed equalities mean the same to both.
            clauses.append(" or ".join(f"{field} == {_literal(key, v)}" for v in value))
        else:
            clauses.append(f"{field} == {_literal(key, value)}")
    return " and ".join(f"({clause})" for clause in clauses)


def _literal(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidChunks(f"metadata filter {key!r}: integer out of 64-bit range")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidChunks(f"metadata filter {key!r}: numbers must be finite")
        return json.dumps(value)
    if isinstance(value, str):
        if any((ord(c) < 0x20 and c not in "\t\n\r") or ord(c) == 0x7F for c in value):
            raise InvalidChunks(f"metadata filter {key!r}: control characters in a value")
        _utf8_bytes(f"metadata filter {key!r}", value)
        return json.dumps(value, ensure_ascii=False)
    raise InvalidChunks(
        f"metadata filter {key!r}: values must be strings, numbers, booleans or lists of them"
    )


class MilvusIndex:
    """`VectorIndex` on a Milvus server through pymilvus's MilvusClient.

    Each collection: chunk_id (primary key), document_uuid, text (analyzed; Milvus's BM25
    function turns it into the `sparse` vector), start/end offsets, metadata (JSON), the
    dense embedding (FLAT index, cosine). Consistency is Strong: a search right after an
    insert or delete sees it. Writes are upserts, so a retried insert never duplicates.

    `ensure_server` (the embedded default: LocalMilvus.ensure) is called when Milvus cannot
    be reached: it restarts a dead embedded server and returns its URI, and the call is
    retried once. Every Milvus failure surfaces as BackendUnavailable (503)."""

    def __init__(
        self,
        uri: str,
        token: str | None = None,
        *,
        ensure_server: Callable[[], str] | None = None,
        timeout_s: float = 30,
    ) -> None:
        self.uri = uri
        self._token = token
        self._ensure_server = ensure_server
        self._timeout_s = timeout_s
        self._client: MilvusClient | None = None
        self._client_lock = threading.Lock()

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- VectorIndex -----------------------------------------------------------------------

    def create_collection(self, name: str, *, dimension: int) -> None:
        _check_name(name)
        if not 1 <= dimension <= 32_768:
            raise InvalidChunks(f"embedding dimension {dimension} is outside 1..32768")

        def create(client: MilvusClient) -> None:
            if client.has_collection(name):
                return
            client.create_collection(
                name,
                schema=_schema(client, dimension),
                index_params=_index_params(client),
                consistency_level="Strong",
            )

        self._call(f"create collection {name}", create)

    def drop_collection(self, name: str) -> None:
        _check_name(name)

        def drop(client: MilvusClient) -> None:
            if client.has_collection(name):
                client.drop_collection(name)

        self._call(f"drop collection {name}", drop)

    def has_collection(self, name: str) -> bool:
        _check_name(name)
        return self._call(f"look up collection {name}", lambda c: bool(c.has_collection(name)))

    def insert(self, name: str, chunks: Sequence[ChunkRecord]) -> None:
        _check_name(name)
        if not chunks:
            return
        rows = [_row(chunk) for chunk in chunks]
        if len({row["chunk_id"] for row in rows}) != len(rows):
            raise InvalidChunks("chunk ids repeat within one insert")
        dimensions = {len(row["dense"]) for row in rows}
        written: list[str] = []

        def upsert(client: MilvusClient) -> None:
            expected = self._dimension(client, name)
            if dimensions != {expected}:
                raise InvalidChunks(
                    f"embeddings have dimension {sorted(dimensions)}; the bank's is {expected}"
                )
            for offset in range(len(written), len(rows), INSERT_BATCH):
                batch = rows[offset : offset + INSERT_BATCH]
                client.upsert(name, batch, timeout=self._timeout_s)
                written.extend(row["chunk_id"] for row in batch)

        try:
            self._call(f"insert into {name}", upsert, collection=name)
        except BackendUnavailable:
            # Milvus has no transactions: take out what this call wrote, then report.
            if written:
                with contextlib.suppress(BackendUnavailable):
                    self.delete_chunks(name, written)
            raise

    def delete_chunks(self, name: str, chunk_ids: Sequence[str]) -> None:
        _check_name(name)
        ids = list(dict.fromkeys(chunk_ids))
        if not ids:
            return

        def delete(client: MilvusClient) -> None:
            for offset in range(0, len(ids), DELETE_BATCH):
                client.delete(name, ids=ids[offset : offset + DELETE_BATCH])

        self._call(f"delete chunks from {name}", delete, collection=name)

    def delete_documents(self, name: str, document_uuids: Sequence[str]) -> None:
        _check_name(name)
        uuids = list(dict.fromkeys(document_uuids))
        if not uuids:
            return

        def delete(client: MilvusClient) -> None:
            for offset in range(0, len(uuids), DELETE_BATCH):
                batch = uuids[offset : offset + DELETE_BATCH]
                literals = ", ".join(_literal("document_uuid", u) for u in batch)
                client.delete(name, filter=f"document_uuid in [{literals}]")

        self._call(f"delete documents from {name}", delete, collection=name)

    def chunk_ids(self, name: str, document_uuid: str) -> list[str]:
        _check_name(name)
        expression = f"document_uuid == {_literal('document_uuid', document_uuid)}"

        def query(client: MilvusClient) -> list[str]:
            rows = client.query(
                name,
                filter=expression,
                output_fields=["chunk_id"],
                limit=MAX_RESULT_ROWS,
                consistency_level="Strong",
            )
            return sorted(str(row["chunk_id"]) for row in rows)

        return self._call(f"list chunks in {name}", query, collection=name)

    def search(
        self,
        name: str,
        *,
        text: str,
        embedding: Sequence[float],
        top_k: int,
        metadata_filter: MetadataFilter | None = None,
        mode: SearchMode = "hybrid",
    ) -> list[ChunkHit]:
        _check_name(name)
        if not 1 <= top_k <= MAX_RESULT_ROWS:
            raise InvalidChunks(f"top_k must be within 1..{MAX_RESULT_ROWS}")
        expression = filter_expression(metadata_filter)
        has_text = bool(text.strip())
        if mode == "keyword" and not has_text:
            return []
        if mode == "hybrid" and not has_text:
            mode = "dense"  # nothing for BM25 to rank by
        vector = [float(x) for x in embedding]

        def run(client: MilvusClient) -> list[ChunkHit]:
            if mode != "keyword" and len(vector) != self._dimension(client, name):
                raise InvalidChunks("the query embedding's dimension is not the bank's")
            if mode == "dense":
                results = client.search(
                    name,
                    data=[vector],
                    anns_field="dense",
                    limit=top_k,
                    filter=expression,
                    output_fields=_OUTPUT_FIELDS,
                    search_params={"metric_type": "COSINE"},
                    consistency_level="Strong",
                )
                return [_hit(hit, float(hit["distance"])) for hit in results[0]]
            if mode == "keyword":
                results = client.search(
                    name,
                    data=[text],
                    anns_field="sparse",
                    limit=top_k,
                    filter=expression,
                    output_fields=_OUTPUT_FIELDS,
                    search_params={"metric_type": "BM25"},
                    consistency_level="Strong",
                )
                # Milvus returns the BM25 score, Milvus Lite its negation (smaller is
                # nearer there); a BM25 score is never negative, so abs() is both.
                return [_hit(hit, abs(float(hit["distance"]))) for hit in results[0]]
            candidates = min(
                max(top_k * HYBRID_CANDIDATES_PER_HIT, MIN_HYBRID_CANDIDATES), MAX_RESULT_ROWS
            )
            requests = [
                AnnSearchRequest(
                    data=[vector],
                    anns_field="dense",
                    param={"metric_type": "COSINE"},
                    limit=candidates,
                    expr=expression or None,
                ),
                AnnSearchRequest(
                    data=[text],
                    anns_field="sparse",
                    param={"metric_type": "BM25"},
                    limit=candidates,
                    expr=expression or None,
                ),
            ]
            results = client.hybrid_search(
                name,
                requests,
                RRFRanker(RRF_K),
                limit=top_k,
                output_fields=_OUTPUT_FIELDS,
                consistency_level="Strong",
            )
            return [_hit(hit, float(hit["distance"])) for hit in results[0]]

        return self._call(f"search {name}", run, collection=name)

    # -- internals ---------------------------------------------------------------------------

    def _connect(self) -> MilvusClient:
        with self._client_lock:
            if self._client is None:
                self._client = open_client(
                    self.uri, token=self._token or "", timeout_s=self._timeout_s
                )
            return self._client

    def _call(
        self,
        what: str,
        operation: Callable[[MilvusClient], _T],
        *,
        collection: str | None = None,
    ) -> _T:
        """Run `operation` on the client; Milvus failures become BackendUnavailable.

        Where Milvus could not be reached, the call is retried once on a fresh connection
        (a server closes a channel that sat idle too long: gRPC's GOAWAY too_many_pings),
        and then, if there is an embedded server, once more after (re)starting it; where
        `collection` was not loaded (a server restarted since), it is loaded and the call
        retried once."""
        reconnected = restarted = loaded = False
        while True:
            try:
                return operation(self._connect())
            except InvalidChunks:
                raise
            except (MilvusException, grpc.RpcError, OSError) as exc:
                if collection is not None and not loaded and _is_not_loaded(exc):
                    loaded = True
                    with contextlib.suppress(MilvusException, grpc.RpcError, OSError):
                        self._connect().load_collection(collection)
                    continue
                unreachable = _is_unreachable(exc)
                if unreachable and not reconnected:
                    reconnected = True
                    self.close()
                    continue
                if unreachable and not restarted and self._ensure_server is not None:
                    restarted = True
                    self.close()
                    try:
                        self.uri = self._ensure_server()
                    except Exception as start_exc:
                        raise BackendUnavailable(
                            f"Milvus at {self.uri} is unreachable and the embedded server "
                            f"could not be restarted: {start_exc}"
                        ) from exc
                    continue
                if unreachable:
                    self.close()  # a fresh connection next time
                    raise BackendUnavailable(
                        f"Milvus at {self.uri} is unavailable ({what}): {_reason(exc)}"
                    ) from exc
                raise BackendUnavailable(f"Milvus failed to {what}: {_reason(exc)}") from exc

    def _dimension(self, client: MilvusClient, name: str) -> int:
        description = client.describe_collection(name)
        for field_info in description["fields"]:
            if field_info["name"] == "dense":
                return int(field_info["params"]["dim"])
        raise BackendUnavailable(f"collection {name} has no dense vector field")


_T = TypeVar("_T")


def build_vector_index(settings: Settings) -> MilvusIndex:
    """The index memory banks use: the configured Milvus server, or the embedded Milvus
    Lite server under ``settings.home`` (started if needed, restarted if it died)."""
    from corral.milvus_server import LocalMilvus

    if settings.milvus_uri:
        return MilvusIndex(settings.milvus_uri, settings.milvus_token or None)
    local = LocalMilvus(settings.home)
    return MilvusIndex(local.ensure(), ensure_server=local.ensure)


def _check_name(name: str) -> None:
    if not _COLLECTION_NAME.match(name):
        raise InvalidChunks(f"collection name {name!r} is not a Milvus identifier")


def _schema(client: MilvusClient, dimension: int) -> CollectionSchema:
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field("document_uuid", DataType.VARCHAR, max_length=MAX_ID_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True)
    schema.add_field("start", DataType.INT64)
    schema.add_field("end", DataType.INT64)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dimension)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(
        Function(
            name="text_bm25",
            function_type=FunctionType.BM25,
            input_field_names=["text"],
            output_field_names=["sparse"],
        )
    )
    return schema


def _index_params(client: MilvusClient) -> IndexParams:
    params = client.prepare_index_params()
    params.add_index(field_name="dense", index_type="FLAT", metric_type="COSINE")
    params.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    return params


def _row(chunk: ChunkRecord) -> dict[str, Any]:
    for label, value in (("chunk id", chunk.chunk_id), ("document uuid", chunk.document_uuid)):
        if not 1 <= _utf8_bytes(label, value) <= MAX_ID_BYTES:
            raise InvalidChunks(f"{label} {value[:40]!r} must be 1..{MAX_ID_BYTES} bytes")
    text_bytes = _utf8_bytes(f"chunk {chunk.chunk_id!r}", chunk.text)
    if text_bytes > MAX_TEXT_BYTES:
        raise InvalidChunks(
            f"chunk {chunk.chunk_id!r} is {text_bytes} bytes of text; Milvus stores at most "
            f"{MAX_TEXT_BYTES}: use smaller chunks"
        )
    if not 0 <= chunk.start <= chunk.end <= _INT64[1]:
        raise InvalidChunks(f"chunk {chunk.chunk_id!r}: offsets must satisfy 0 <= start <= end")
    try:
        metadata_bytes = len(
            json.dumps(chunk.metadata, allow_nan=False, ensure_ascii=False).encode()
        )
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) too
        raise InvalidChunks(f"chunk {chunk.chunk_id!r}: metadata is not JSON: {exc}") from None
    if metadata_bytes > MAX_METADATA_BYTES:
        raise InvalidChunks(f"chunk {chunk.chunk_id!r}: metadata over {MAX_METADATA_BYTES} bytes")
    vector = [float(x) for x in chunk.embedding]
    if not all(math.isfinite(x) for x in vector):
        raise InvalidChunks(f"chunk {chunk.chunk_id!r}: embedding is not finite")
    return {
        "chunk_id": chunk.chunk_id,
        "document_uuid": chunk.document_uuid,
        "text": chunk.text,
        "start": chunk.start,
        "end": chunk.end,
        "metadata": chunk.metadata,
        "dense": vector,
    }


def _utf8_bytes(label: str, value: str) -> int:
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise InvalidChunks(f"{label}: not valid Unicode (a lone surrogate)") from None


def _hit(hit: dict[str, Any], score: float) -> ChunkHit:
    entity = hit["entity"]
    return ChunkHit(
        chunk_id=str(entity.get("chunk_id", hit.get("id"))),
        document_uuid=str(entity["document_uuid"]),
        text=str(entity["text"]),
        start=int(entity["start"]),
        end=int(entity["end"]),
        metadata=dict(entity.get("metadata") or {}),
        score=score,
    )


def _is_unreachable(exc: BaseException) -> bool:
    """Whether Milvus could not be reached at all (rather than refusing the request)."""
    if isinstance(exc, OSError):
        return True
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if isinstance(exc, ConnectError | MilvusUnavailableException):
        return True
    text = str(exc).lower()
    return any(
        marker in text
        for marker in ("unavailable", "fail connecting", "connection refused", "deadline")
    )


def _is_not_loaded(exc: BaseException) -> bool:
    """Whether Milvus refused because the collection is not loaded (code 101)."""
    if not isinstance(exc, MilvusException):
        return False
    text = str(exc.message).lower()
    return exc.code == 101 or "not loaded" in text or "load()" in text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MilvusException):
        return f"{exc.message} (code {exc.code})"
    return f"{type(exc).__name__}: {exc}"
