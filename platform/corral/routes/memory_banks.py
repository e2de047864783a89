"""Memory bank routes: HTTP only; the MemoryBankService does the work. A server without
a vector store (Milvus) validates each request, then answers 501 naming the missing
capability.

The spec has two prefixes: `/memory_banks/...` for the set of banks and `/memory_bank/...`
for the documents of one bank (whose `get` is a POST with a JSON list of ids). Corral's
own routes (tag "Corral", `corral_router`) set a bank's chunking and embedding settings,
read them, and query a bank."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from corral.api.common import Id
from corral.api.errors import JSON_ERROR_RESPONSE
from corral.api.memory_banks import (
    ConfigureMemoryBankRequest,
    MemoryBank,
    MemoryBankDocument,
    MemoryBankQueryRequest,
    MemoryBankQueryResponse,
    MemoryBankSettings,
    RetrievedChunkModel,
)
from corral.deps import TenantDep
from corral.errors import CapabilityUnavailable
from corral.routes.responses import OK, JSONLinesResponse, empty_ok
from corral.services.container import Services
from corral.services.memory_banks import MemoryBankService

router = APIRouter(tags=["MemoryBanks"])
corral_router = APIRouter(tags=["Corral"])

Documents = Annotated[list[MemoryBankDocument], Body()]
DocumentIds = Annotated[list[Id], Body()]


def _optional_banks(request: Request) -> MemoryBankService | None:
    # Not raised here: a dependency runs before the request is validated, and an invalid
    # request gets its 422 first.
    return cast(Services, request.app.state.services).memory_banks


BanksDep = Annotated[MemoryBankService | None, Depends(_optional_banks)]


def _need(banks: MemoryBankService | None) -> MemoryBankService:
    if banks is None:
        raise CapabilityUnavailable("memory_banks", "this server has no vector store (Milvus)")
    return banks


@router.post("/memory_banks/create", response_class=Response, response_description=OK)
async def create_memory_bank(
    bank_uuid: Id, bank_name: Id, documents: Documents, tenant: TenantDep, banks: BanksDep
) -> Response:
    await _need(banks).create(
        tenant=tenant, bank_uuid=bank_uuid, bank_name=bank_name, documents=documents
    )
    return empty_ok()


@router.get(
    "/memory_banks/get",
    response_class=JSONLinesResponse,
    responses={200: {"model": MemoryBank, "description": OK}, "default": JSON_ERROR_RESPONSE},
)
async def list_memory_banks(tenant: TenantDep, banks: BanksDep) -> JSONLinesResponse:
    return JSONLinesResponse(await _need(banks).list_banks(tenant=tenant))


@router.delete("/memory_banks/drop", response_class=Response, response_description=OK)
async def drop_memory_bank(bank_uuid: Id, tenant: TenantDep, banks: BanksDep) -> Response:
    await _need(banks).drop(tenant=tenant, bank_uuid=bank_uuid)
    return empty_ok()


@router.post("/memory_bank/insert", response_class=Response, response_description=OK)
async def insert_documents(
    bank_uuid: Id, documents: Documents, tenant: TenantDep, banks: BanksDep
) -> Response:
    await _need(banks).insert(tenant=tenant, bank_uuid=bank_uuid, documents=documents)
    return empty_ok()


@router.post("/memory_bank/update", response_class=Response, response_description=OK)
async def update_documents(
    bank_uuid: Id, documents: Documents, tenant: TenantDep, banks: BanksDep
) -> Response:
    await _need(banks).update(tenant=tenant, bank_uuid=bank_uuid, documents=documents)
    return empty_ok()


@router.post("/memory_bank/delete", response_class=Response, response_description=OK)
async def delete_documents(
    bank_uuid: Id, document_uuids: DocumentIds, tenant: TenantDep, banks: BanksDep
) -> Response:
    await _need(banks).delete(tenant=tenant, bank_uuid=bank_uuid, document_uuids=document_uuids)
    return empty_ok()


@router.post(
    "/memory_bank/get",
    response_class=JSONLinesResponse,
    responses={
        200: {"model": MemoryBankDocument, "description": OK},
        "default": JSON_ERROR_RESPONSE,
    },
)
async def get_documents(
    bank_uuid: Id, document_uuids: DocumentIds, tenant: TenantDep, banks: BanksDep
) -> JSONLinesResponse:
    documents = await _need(banks).get(
        tenant=tenant, bank_uuid=bank_uuid, document_uuids=document_uuids
    )
    return JSONLinesResponse(documents)


# ------------------------------------------------------------------ Corral's own


@corral_router.post("/memory_banks/configure", response_description=OK)
async def configure_memory_bank(
    body: ConfigureMemoryBankRequest, tenant: TenantDep, banks: BanksDep
) -> MemoryBankSettings:
    """Make an empty bank with its own chunking and embedding settings (the spec's create
    takes none): the same request again is a no-op, other settings for it a 409."""
    return await _need(banks).configure(
        tenant=tenant,
        bank_uuid=body.bank_uuid,
        bank_name=body.bank_name,
        embedding_model=body.embedding_model,
        chunk_tokens=body.chunk_tokens,
        overlap_tokens=body.overlap_tokens,
    )


@corral_router.get("/memory_banks/settings", response_description=OK)
async def memory_bank_settings(
    bank_uuid: Id, tenant: TenantDep, banks: BanksDep
) -> MemoryBankSettings:
    return await _need(banks).settings(tenant=tenant, bank_uuid=bank_uuid)


@corral_router.post("/memory_bank/query", response_description=OK)
async def query_memory_bank(
    body: MemoryBankQueryRequest, tenant: TenantDep, banks: BanksDep
) -> MemoryBankQueryResponse:
    """A bank's best chunks for a query, best first, each with its document's uuid and
    its character offsets in the document's text (so that answers can cite them)."""
    chunks = await _need(banks).query(
        tenant=tenant,
        bank_uuid=body.bank_uuid,
        query=body.query,
        top_k=body.top_k,
        metadata_filter=body.metadata_filter,
        mode=body.mode,
    )
    return MemoryBankQueryResponse(
        chunks=[
            RetrievedChunkModel(
                document_uuid=c.document_uuid,
                chunk_id=c.chunk_id,
                text=c.text,
                start=c.start,
                end=c.end,
                score=c.score,
                metadata=c.metadata,
            )
            for c in chunks
        ]
    )
