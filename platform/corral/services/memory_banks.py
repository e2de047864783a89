"""Memory banks: documents decoded by mime type, cut into token windows of the bank's
embedding model, embedded on Serve, and kept as chunks in the bank's own Milvus
collection (`corral_<hex>`, named here); the documents themselves, exactly as sent, and
the version of each whose chunks are current, in the SQL store (the row is the truth).

Milvus has no transactions, so every write goes Milvus first, then SQL in one
transaction, and undoes what it wrote to Milvus when anything after fails. What a crash
can leave behind (chunks of a version SQL never switched to, or of a document SQL no
longer has) is invisible: a search drops every hit whose version is not its document's
current one, and the next write of that document removes the leftovers first.

An update writes the next version's chunks, switches the row to that version, then
deletes the old version's chunks: at every moment one complete version is visible.
Writes to one bank are serialized within this process; across API processes, a write
that finds its document changed since it read it is refused (409: try again)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import uuid as uuid_lib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from corral.api.memory_banks import MemoryBank, MemoryBankDocument, MemoryBankSettings
from corral.errors import Conflict, ContentTooLarge, InvalidRequest, NotFound
from corral.memory.chunking import chunk_windows
from corral.memory.documents import DocumentError, DocumentTooLarge, decode_document
from corral.memory.types import BankSettings, RetrievedChunk
from corral.services import model_calls
from corral.services.ids import check_id
from corral.services.inference import ModelRouter
from corral.store.db import Database
from corral.store.digest import request_digest
from corral.store.memory_banks import MemoryBankStore
from corral.vector_index import ChunkHit, ChunkRecord, MetadataFilter, SearchMode, VectorIndex

log = logging.getLogger(__name__)

# Hits asked of Milvus per hit wanted, and the most asked at once: stale hits (an update
# under way) are dropped after the search, so a search asks for more than it returns.
OVERFETCH = 2
MAX_FETCH = 1_024  # well below Milvus's own limit (16384 rows a search)


def new_collection_name() -> str:
    return f"corral_{uuid_lib.uuid4().hex}"


def chunk_id(document_uuid: str, version: int, index: int) -> str:
    return f"{document_uuid}:{version}:{index}"


def chunk_version(chunk: str) -> int | None:
    """The document version a chunk id names (None for an id not made here)."""
    parts = chunk.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


@dataclass(frozen=True)
class Bank:
    tenant: str
    uuid: str
    name: str
    collection: str
    settings: BankSettings
    dimension: int


@dataclass(frozen=True)
class Prepared:
    """A document ready to write: its fingerprint and its chunks (embedded)."""

    document: MemoryBankDocument
    digest: str
    chunks: list[ChunkRecord]


class MemoryBankService:
    """The seven spec operations, Corral's settings and query routes, and the agents'
    `Retriever`. Everything is scoped by tenant: another tenant's bank is NotFound, the
    same answer as a bank nobody has."""

    def __init__(
        self,
        *,
        database: Database,
        index: VectorIndex,
        models: ModelRouter,
        defaults: BankSettings,
        max_document_bytes: int,
        collection_names: Callable[[], str] = new_collection_name,
    ) -> None:
        self._db = database
        self._index = index
        self._models = models
        self._defaults = defaults
        self._max_document_bytes = max_document_bytes
        self._collection_names = collection_names
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # ------------------------------------------------------------------ banks

    async def create(
        self,
        *,
        tenant: str,
        bank_uuid: str,
        bank_name: str,
        documents: Sequence[MemoryBankDocument],
    ) -> None:
        """The spec's create: a bank with the default settings and these documents. The
        same request again is a no-op; another name for a bank that exists, 409. When the
        documents cannot be stored, neither is a bank this call made."""
        check_id(bank_uuid, what="bank_uuid")
        async with self._lock(tenant, bank_uuid):
            existing = await self._find_bank(tenant, bank_uuid)
            if existing is not None:
                if existing.name != bank_name:
                    raise Conflict(f"memory bank {bank_uuid!r} exists with another name")
                await self._insert(existing, documents)
                return
            bank = await self._make_bank(tenant, bank_uuid, bank_name, self._defaults)
            try:
                await self._insert(bank, documents)
            except BaseException:
                await asyncio.to_thread(self._remove_bank, bank)
                raise

    async def configure(
        self,
        *,
        tenant: str,
        bank_uuid: str,
        bank_name: str,
        embedding_model: str | None = None,
        chunk_tokens: int | None = None,
        overlap_tokens: int | None = None,
    ) -> MemoryBankSettings:
        """An empty bank with these settings (the defaults for what is None). The same
        settings again are a no-op; other ones for a bank that exists, 409."""
        check_id(bank_uuid, what="bank_uuid")
        try:
            settings = BankSettings(
                embedding_model=embedding_model or self._defaults.embedding_model,
                chunk_tokens=chunk_tokens or self._defaults.chunk_tokens,
                overlap_tokens=(
                    overlap_tokens if overlap_tokens is not None else self._defaults.overlap_tokens
                ),
            )
        except ValidationError as exc:
            raise InvalidRequest(_first_problem(exc)) from None
        async with self._lock(tenant, bank_uuid):
            bank = await self._find_bank(tenant, bank_uuid)
            if bank is None:
                bank = await self._make_bank(tenant, bank_uuid, bank_name, settings)
            elif bank.name != bank_name or bank.settings != settings:
                raise Conflict(f"memory bank {bank_uuid!r} exists with other settings")
        return _settings_view(bank)

    async def settings(self, *, tenant: str, bank_uuid: str) -> MemoryBankSettings:
        return _settings_view(await self._bank(tenant, bank_uuid))

    async def list_banks(self, *, tenant: str) -> list[MemoryBank]:
        def read() -> list[MemoryBank]:
            with self._db.transaction() as session:
                rows = MemoryBankStore(session).find(tenant=tenant)
                return [MemoryBank(uuid=row.uuid, name=row.name) for row in rows]

        return await asyncio.to_thread(read)

    async def drop(self, *, tenant: str, bank_uuid: str) -> None:
        """The bank, its documents and its collection."""
        async with self._lock(tenant, bank_uuid):
            bank = await self._bank(tenant, bank_uuid)
            await asyncio.to_thread(self._remove_bank, bank)

    # ------------------------------------------------------------------ documents

    async def insert(
        self, *, tenant: str, bank_uuid: str, documents: Sequence[MemoryBankDocument]
    ) -> None:
        """New documents. One already stored, identical, is a no-op; another document
        under a stored uuid is a 409 (that is what update is for), and nothing is stored."""
        async with self._lock(tenant, bank_uuid):
            await self._insert(await self._bank(tenant, bank_uuid), documents)

    async def update(
        self, *, tenant: str, bank_uuid: str, documents: Sequence[MemoryBankDocument]
    ) -> None:
        """Replace stored documents (NotFound naming any the bank does not have): each
        changed one gets a new version, whose chunks are in before the old ones go."""
        async with self._lock(tenant, bank_uuid):
            bank = await self._bank(tenant, bank_uuid)
            documents = _unique(documents)
            uuids = [d.uuid for d in documents]
            stored = await asyncio.to_thread(self._versions_and_digests, bank, uuids)
            _all_found(uuids, stored, bank_uuid)
            changed = [d for d in documents if stored[d.uuid][1] != _digest(d)]
            if not changed:
                return
            versions = {d.uuid: stored[d.uuid][0] for d in changed}
            prepared = await self._prepare(bank, changed, version_of=lambda d: versions[d.uuid] + 1)
            await asyncio.to_thread(self._write_update, bank, prepared, versions)

    async def delete(self, *, tenant: str, bank_uuid: str, document_uuids: Sequence[str]) -> None:
        """Remove documents (NotFound, and nothing removed, when any is not stored)."""
        async with self._lock(tenant, bank_uuid):
            bank = await self._bank(tenant, bank_uuid)
            uuids = list(dict.fromkeys(document_uuids))

            def remove() -> None:
                with self._db.transaction() as session:
                    store = MemoryBankStore(session)
                    found = store.documents(tenant=tenant, bank_uuid=bank.uuid, uuids=uuids)
                    _all_found(uuids, found, bank.uuid)
                    store.delete_documents(tenant=tenant, bank_uuid=bank.uuid, uuids=uuids)
                # Chunks left by a failure here are invisible (no row) and are removed at
                # that uuid's next insert.
                self._quietly(self._index.delete_documents, bank.collection, uuids)

            await asyncio.to_thread(remove)

    async def get(
        self, *, tenant: str, bank_uuid: str, document_uuids: Sequence[str]
    ) -> list[MemoryBankDocument]:
        """The documents as they were sent, in the order asked (each once); NotFound
        naming the uuids the bank does not have, as for a bank it does not have."""
        bank = await self._bank(tenant, bank_uuid)
        uuids = list(dict.fromkeys(document_uuids))

        def read() -> list[MemoryBankDocument]:
            with self._db.transaction() as session:
                rows = MemoryBankStore(session).documents(
                    tenant=tenant, bank_uuid=bank.uuid, uuids=uuids
                )
                _all_found(uuids, rows, bank.uuid)
                return [
                    MemoryBankDocument(
                        uuid=rows[u].uuid,
                        content=rows[u].content,
                        metadata=rows[u].metadata_,
                        mime_type=rows[u].mime_type,
                    )
                    for u in uuids
                ]

        return await asyncio.to_thread(read)

    # ------------------------------------------------------------------ retrieval

    async def query(
        self,
        *,
        tenant: str,
        bank_uuid: str,
        query: str,
        top_k: int,
        metadata_filter: MetadataFilter | None = None,
        mode: SearchMode = "hybrid",
    ) -> list[RetrievedChunk]:
        """The bank's best `top_k` chunks of current document versions, best first."""
        bank = await self._bank(tenant, bank_uuid)
        embedding: list[float] = []
        if mode != "keyword":
            (embedding,) = await model_calls.embed(self._embedder(bank), [query])
        hits = await asyncio.to_thread(
            self._search, bank, query, embedding, top_k, metadata_filter, mode
        )
        return [
            RetrievedChunk(
                bank_uuid=bank.uuid,
                document_uuid=hit.document_uuid,
                chunk_id=hit.chunk_id,
                text=hit.text,
                start=hit.start,
                end=hit.end,
                score=hit.score,
                metadata=hit.metadata,
            )
            for hit in hits
        ]

    def _search(
        self,
        bank: Bank,
        query: str,
        embedding: list[float],
        top_k: int,
        metadata_filter: MetadataFilter | None,
        mode: SearchMode,
    ) -> list[ChunkHit]:
        fetch = min(MAX_FETCH, max(top_k * OVERFETCH, top_k + 8))
        while True:
            hits = self._index.search(
                bank.collection,
                text=query,
                embedding=embedding,
                top_k=fetch,
                metadata_filter=metadata_filter,
                mode=mode,
            )
            current = self._current(bank, hits)
            if len(current) >= top_k or len(hits) < fetch or fetch >= MAX_FETCH:
                return current[:top_k]
            fetch = min(MAX_FETCH, fetch * 4)

    def _current(self, bank: Bank, hits: Sequence[ChunkHit]) -> list[ChunkHit]:
        """The hits of each document's current version, each chunk once."""
        uuids = list({hit.document_uuid for hit in hits})
        with self._db.transaction() as session:
            versions = MemoryBankStore(session).current_versions(
                tenant=bank.tenant, bank_uuid=bank.uuid, uuids=uuids
            )
        seen: set[str] = set()
        kept = []
        for hit in hits:
            version = chunk_version(hit.chunk_id)
            if hit.chunk_id in seen or version != versions.get(hit.document_uuid):
                continue
            seen.add(hit.chunk_id)
            kept.append(hit)
        return kept

    # ------------------------------------------------------------------ internals

    def _lock(self, tenant: str, bank_uuid: str) -> asyncio.Lock:
        key = (tenant, bank_uuid)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def _find_bank(self, tenant: str, bank_uuid: str) -> Bank | None:
        def read() -> Bank | None:
            with self._db.transaction() as session:
                row = MemoryBankStore(session).get(tenant=tenant, uuid=bank_uuid)
                if row is None:
                    return None
                return Bank(
                    tenant=row.tenant,
                    uuid=row.uuid,
                    name=row.name,
                    collection=row.collection,
                    settings=BankSettings(
                        embedding_model=row.embedding_model,
                        chunk_tokens=row.chunk_tokens,
                        overlap_tokens=row.overlap_tokens,
                    ),
                    dimension=row.dimension,
                )

        return await asyncio.to_thread(read)

    async def _bank(self, tenant: str, bank_uuid: str) -> Bank:
        bank = await self._find_bank(tenant, bank_uuid)
        if bank is None:
            raise NotFound(f"no memory bank {bank_uuid[:200]!r}")
        return bank

    def _embedder(self, bank: Bank) -> Any:
        """The handle of the bank's embedding model (it was one when the bank was made)."""
        try:
            return self._models.handle_for(
                tenant=bank.tenant, model=bank.settings.embedding_model, kind="embedding"
            )
        except NotFound:
            raise InvalidRequest(
                f"memory bank {bank.uuid!r}: its embedding model "
                f"{bank.settings.embedding_model!r} is not served any more"
            ) from None

    async def _make_bank(
        self, tenant: str, bank_uuid: str, bank_name: str, settings: BankSettings
    ) -> Bank:
        """A new bank's collection, then its row (the collection goes again if the row
        cannot be written). The embedding model must be one the tenant can use, and take
        whole chunks."""
        try:
            handle = self._models.handle_for(
                tenant=tenant, model=settings.embedding_model, kind="embedding"
            )
        except NotFound:
            raise InvalidRequest(
                f"embedding_model: no model {settings.embedding_model!r} is served"
            ) from None
        info = await model_calls.embedding_info(handle)
        if settings.chunk_tokens > info.max_tokens:
            raise InvalidRequest(
                f"chunk_tokens: {settings.chunk_tokens} is more than the "
                f"{info.max_tokens} tokens {settings.embedding_model!r} embeds whole"
            )
        bank = Bank(
            tenant=tenant,
            uuid=bank_uuid,
            name=bank_name,
            collection=self._collection_names(),
            settings=settings,
            dimension=info.dimension,
        )

        def write() -> None:
            self._index.create_collection(bank.collection, dimension=bank.dimension)
            try:
                with self._db.transaction() as session:
                    MemoryBankStore(session).add(
                        tenant=tenant,
                        uuid=bank_uuid,
                        name=bank_name,
                        collection=bank.collection,
                        settings=settings,
                        dimension=bank.dimension,
                    )
            except BaseException:
                self._quietly(self._index.drop_collection, bank.collection)
                raise

        try:
            await asyncio.to_thread(write)
        except IntegrityError:
            # Another API process made this bank first: its settings decide.
            other = await self._bank(tenant, bank_uuid)
            if other.name != bank_name or other.settings != settings:
                raise Conflict(f"memory bank {bank_uuid!r} exists with other settings") from None
            return other
        return bank

    async def _open_collection(self, bank: Bank) -> Bank:
        """The collection of a bank stored before banks had settings (migration 0008),
        made at its first insert with its model's dimension."""
        info = await model_calls.embedding_info(self._embedder(bank))
        opened = dataclasses.replace(bank, dimension=info.dimension)

        def write() -> None:
            self._index.create_collection(bank.collection, dimension=info.dimension)
            with self._db.transaction() as session:
                MemoryBankStore(session).set_dimension(
                    tenant=bank.tenant, uuid=bank.uuid, dimension=info.dimension
                )

        await asyncio.to_thread(write)
        return opened

    def _remove_bank(self, bank: Bank) -> None:
        with self._db.transaction() as session:
            MemoryBankStore(session).delete(tenant=bank.tenant, uuid=bank.uuid)
        # The row is gone, so the collection is no one's: a failure leaves it unused.
        self._quietly(self._index.drop_collection, bank.collection)

    def _versions_and_digests(self, bank: Bank, uuids: Sequence[str]) -> dict[str, tuple[int, str]]:
        with self._db.transaction() as session:
            rows = MemoryBankStore(session).documents(
                tenant=bank.tenant, bank_uuid=bank.uuid, uuids=uuids
            )
            return {u: (row.version, row.content_digest) for u, row in rows.items()}

    async def _insert(self, bank: Bank, documents: Sequence[MemoryBankDocument]) -> None:
        documents = _unique(documents)
        for document in documents:
            check_id(document.uuid, what="document uuid")
        stored = await asyncio.to_thread(
            self._versions_and_digests, bank, [d.uuid for d in documents]
        )
        new = [d for d in documents if _same_or_new(d, stored)]
        if not new:
            return
        if bank.dimension == 0:
            bank = await self._open_collection(bank)
        prepared = await self._prepare(bank, new, version_of=lambda _d: 1)
        await asyncio.to_thread(self._write_new, bank, prepared)

    async def _prepare(
        self,
        bank: Bank,
        documents: Sequence[MemoryBankDocument],
        *,
        version_of: Callable[[MemoryBankDocument], int],
    ) -> list[Prepared]:
        """Decode, chunk and embed every document before anything is written: a document
        that cannot be read refuses the whole request."""
        texts = [await asyncio.to_thread(self._decode, d) for d in documents]
        handle = self._embedder(bank)
        windows = [
            chunk_windows(
                await model_calls.token_spans(handle, text),
                size=bank.settings.chunk_tokens,
                overlap=bank.settings.overlap_tokens,
            )
            for text in texts
        ]
        pieces = [
            text[start:end]
            for text, spans in zip(texts, windows, strict=True)
            for start, end in spans
        ]
        vectors = iter(await model_calls.embed(handle, pieces) if pieces else [])
        prepared = []
        for document, text, spans in zip(documents, texts, windows, strict=True):
            version = version_of(document)
            chunks = [
                ChunkRecord(
                    chunk_id=chunk_id(document.uuid, version, index),
                    document_uuid=document.uuid,
                    text=text[start:end],
                    start=start,
                    end=end,
                    embedding=list(next(vectors)),
                    metadata=dict(document.metadata),
                )
                for index, (start, end) in enumerate(spans)
            ]
            prepared.append(Prepared(document=document, digest=_digest(document), chunks=chunks))
        return prepared

    def _decode(self, document: MemoryBankDocument) -> str:
        where = f"document {document.uuid!r}"
        data = base64.b64decode(document.content, validate=True)
        if len(data) > self._max_document_bytes:
            raise ContentTooLarge(
                f"{where}: {len(data)} bytes is more than the limit of {self._max_document_bytes}"
            )
        try:
            return decode_document(data, document.mime_type, max_bytes=self._max_document_bytes)
        except DocumentTooLarge as exc:
            raise ContentTooLarge(f"{where}: {exc}") from None
        except DocumentError as exc:
            raise InvalidRequest(f"{where}: {exc}") from None

    def _write_new(self, bank: Bank, prepared: Sequence[Prepared]) -> None:
        """New documents' chunks into Milvus, then their rows in one transaction; on any
        failure the chunks come out again."""
        uuids = [p.document.uuid for p in prepared]
        # Chunks of these uuids with no row are what a crashed write left: not ours.
        self._index.delete_documents(bank.collection, uuids)
        records = [chunk for p in prepared for chunk in p.chunks]
        try:
            self._index.insert(bank.collection, records)
            with self._db.transaction() as session:
                store = MemoryBankStore(session)
                for item in prepared:
                    store.add_document(
                        tenant=bank.tenant,
                        bank_uuid=bank.uuid,
                        uuid=item.document.uuid,
                        mime_type=item.document.mime_type,
                        metadata=dict(item.document.metadata),
                        content=item.document.content,
                        content_digest=item.digest,
                        chunk_count=len(item.chunks),
                    )
        except IntegrityError:
            self._quietly(self._index.delete_chunks, bank.collection, [r.chunk_id for r in records])
            raise Conflict(
                "a document of this request was stored by another request meanwhile; send it again"
            ) from None
        except BaseException:
            self._quietly(self._index.delete_chunks, bank.collection, [r.chunk_id for r in records])
            raise

    def _write_update(
        self, bank: Bank, prepared: Sequence[Prepared], versions: dict[str, int]
    ) -> None:
        """The next versions' chunks into Milvus, the rows switched to them in one
        transaction, then every other version's chunks out."""
        records = [chunk for p in prepared for chunk in p.chunks]
        for item in prepared:
            # Chunks of the version about to be written are leftovers of a crashed update.
            new_version = versions[item.document.uuid] + 1
            leftovers = [
                c
                for c in self._index.chunk_ids(bank.collection, item.document.uuid)
                if chunk_version(c) == new_version
            ]
            if leftovers:
                self._index.delete_chunks(bank.collection, leftovers)
        try:
            self._index.insert(bank.collection, records)
            with self._db.transaction() as session:
                store = MemoryBankStore(session)
                for item in prepared:
                    switched = store.replace_document(
                        tenant=bank.tenant,
                        bank_uuid=bank.uuid,
                        uuid=item.document.uuid,
                        from_version=versions[item.document.uuid],
                        mime_type=item.document.mime_type,
                        metadata=dict(item.document.metadata),
                        content=item.document.content,
                        content_digest=item.digest,
                        chunk_count=len(item.chunks),
                    )
                    if not switched:
                        raise Conflict(
                            f"document {item.document.uuid!r} was changed or deleted by "
                            "another request meanwhile; send the update again"
                        )
        except BaseException:
            self._quietly(self._index.delete_chunks, bank.collection, [r.chunk_id for r in records])
            raise
        for item in prepared:
            new_version = versions[item.document.uuid] + 1
            stale = [
                c
                for c in self._index.chunk_ids(bank.collection, item.document.uuid)
                if chunk_version(c) != new_version
            ]
            # Stale chunks are invisible already; a failure leaves them to the next update.
            self._quietly(self._index.delete_chunks, bank.collection, stale)

    def _quietly(self, undo: Callable[..., None], *args: Any) -> None:
        """An undo step: a failure is logged (what it leaves is invisible), never raised
        over the error being answered."""
        try:
            undo(*args)
        except Exception:
            log.exception("memory banks: %s%r failed", getattr(undo, "__name__", undo), args[:1])


def _digest(document: MemoryBankDocument) -> str:
    return request_digest(document.model_dump(mode="json"))


def _unique(documents: Sequence[MemoryBankDocument]) -> list[MemoryBankDocument]:
    """Each uuid once: the same document twice in one request is once; two different
    documents under one uuid are a 422."""
    by_uuid: dict[str, MemoryBankDocument] = {}
    for document in documents:
        seen = by_uuid.get(document.uuid)
        if seen is not None and _digest(seen) != _digest(document):
            raise InvalidRequest(f"two different documents under uuid {document.uuid!r}")
        by_uuid.setdefault(document.uuid, document)
    return list(by_uuid.values())


def _same_or_new(document: MemoryBankDocument, stored: dict[str, tuple[int, str]]) -> bool:
    """True for a document to store; False for one stored as it is; 409 for another
    document under a stored uuid."""
    found = stored.get(document.uuid)
    if found is None:
        return True
    if found[1] != _digest(document):
        raise Conflict(
            f"document {document.uuid!r} is stored with other content: use update to replace it"
        )
    return False


def _all_found(uuids: Sequence[str], found: dict[str, Any], bank_uuid: str) -> None:
    missing = [u for u in uuids if u not in found]
    if missing:
        shown = ", ".join(repr(u[:200]) for u in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NotFound(f"memory bank {bank_uuid[:200]!r} has no document {shown}{more}")


def _settings_view(bank: Bank) -> MemoryBankSettings:
    return MemoryBankSettings(
        bank_uuid=bank.uuid,
        bank_name=bank.name,
        embedding_model=bank.settings.embedding_model,
        chunk_tokens=bank.settings.chunk_tokens,
        overlap_tokens=bank.settings.overlap_tokens,
        dimension=bank.dimension,
    )


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ())) or "settings"
    return f"{where}: {error.get('msg', 'invalid')}"
