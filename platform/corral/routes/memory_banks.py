"""Memory bank routes. No vector store is wired in yet: each operation validates its
request, then answers 501 naming the missing capability.

The spec has two prefixes: `/memory_banks/...` for the set of banks and `/memory_bank/...`
for the documents of one bank (whose `get` is a POST with a JSON list of ids)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from fastapi.responses import Response

from corral.api.common import Id
from corral.api.errors import JSON_ERROR_RESPONSE
from corral.api.memory_banks import MemoryBank, MemoryBankDocument
from corral.errors import CapabilityUnavailable
from corral.routes.responses import OK, JSONLinesResponse

router = APIRouter(tags=["MemoryBanks"])

Documents = Annotated[list[MemoryBankDocument], Body()]
DocumentIds = Annotated[list[Id], Body()]


def _unavailable() -> CapabilityUnavailable:
    return CapabilityUnavailable(
        "memory_banks", "no vector store (Milvus) is wired into this server yet"
    )


@router.post("/memory_banks/create", response_class=Response, response_description=OK)
def create_memory_bank(bank_uuid: Id, bank_name: Id, documents: Documents) -> Response:
    raise _unavailable()


@router.get(
    "/memory_banks/get",
    response_class=JSONLinesResponse,
    responses={200: {"model": MemoryBank, "description": OK}, "default": JSON_ERROR_RESPONSE},
)
def list_memory_banks() -> JSONLinesResponse:
    raise _unavailable()


@router.delete("/memory_banks/drop", response_class=Response, response_description=OK)
def drop_memory_bank(bank_uuid: Id) -> Response:
    raise _unavailable()


@router.post("/memory_bank/insert", response_class=Response, response_description=OK)
def insert_documents(bank_uuid: Id, documents: Documents) -> Response:
    raise _unavailable()


@router.post("/memory_bank/update", response_class=Response, response_description=OK)
def update_documents(bank_uuid: Id, documents: Documents) -> Response:
    raise _unavailable()


@router.post("/memory_bank/delete", response_class=Response, response_description=OK)
def delete_documents(bank_uuid: Id, document_uuids: DocumentIds) -> Response:
    raise _unavailable()


@router.post(
    "/memory_bank/get",
    response_class=JSONLinesResponse,
    responses={
        200: {"model": MemoryBankDocument, "description": OK},
        "default": JSON_ERROR_RESPONSE,
    },
)
def get_documents(bank_uuid: Id, document_uuids: DocumentIds) -> JSONLinesResponse:
    raise _unavailable()
