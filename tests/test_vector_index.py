"""MilvusIndex against a real `milvus-lite server` (the session's `milvus_uri`)."""

from __future__ import annotations

import os
import random
import signal
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.vector_index import ChunkRecord, MilvusIndex, filter_expression

DIM = 8


def collection_name() -> str:
    return f"corral_{uuid.uuid4().hex}"


def vector(seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-1, 1) for _ in range(DIM)]


def chunk(document: str, index: int, text: str, *, seed: int, **metadata: object) -> ChunkRecord:
    return ChunkRecord(
        chunk_id=f"{document}:1:{index}",
        document_uuid=document,
        text=text,
        start=index * 100,
        end=index * 100 + len(text),
        embedding=vector(seed),
        metadata=dict(metadata),
    )


def test_insert_then_search_each_mode(vector_index: MilvusIndex) -> None:
    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    chunks = [
        chunk("doc-a", 0, "llamas graze on the high plateau", seed=1, topic="animals"),
        chunk("doc-a", 1, "the quarterly revenue rose sharply", seed=2, topic="finance"),
        chunk("doc-b", 0, "a zebra crossing near the station", seed=3, topic="city"),
    ]
    vector_index.insert(name, chunks)
    dense = vector_index.search(name, text="", embedding=vector(2), top_k=1, mode="dense")
    assert [h.chunk_id for h in dense] == ["doc-a:1:1"]
    assert dense[0].score == pytest.approx(1.0, abs=1e-5)
    keyword = vector_index.search(name, text="zebra", embedding=vector(9), top_k=3, mode="keyword")
    assert [h.chunk_id for h in keyword] == ["doc-b:1:0"]
    assert keyword[0].score > 0
    hybrid = vector_index.search(name, text="zebra", embedding=vector(3), top_k=3)
    assert hybrid[0].chunk_id == "doc-b:1:0"
    hit = hybrid[0]
    assert (hit.document_uuid, hit.start, hit.end, hit.metadata) == (
        "doc-b",
        0,
        len("a zebra crossing near the station"),
        {"topic": "city"},
    )


def _corpus(count: int) -> list[ChunkRecord]:
    words = ["river", "mountain", "ledger", "budget", "harbor", "forest", "engine", "signal"]
    rng = random.Random(7)
    return [
        chunk(
            f"doc-{i % 10}",
            i,
            " ".join(rng.choice(words) for _ in range(12)),
            seed=1000 + i,
            group=i % 3,
        )
        for i in range(count)
    ]


def test_bm25_finds_an_exact_keyword_that_dense_search_misses(vector_index: MilvusIndex) -> None:
    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    chunks = _corpus(60)
    needle = chunk("doc-needle", 0, "the xylophone recital starts at noon", seed=424242)
    vector_index.insert(name, [*chunks, needle])
    query = vector(5)  # a random direction, unrelated to the needle's embedding
    dense = vector_index.search(name, text="xylophone", embedding=query, top_k=5, mode="dense")
    assert needle.chunk_id not in [h.chunk_id for h in dense]
    keyword = vector_index.search(name, text="xylophone", embedding=query, top_k=5, mode="keyword")
    assert [h.chunk_id for h in keyword] == [needle.chunk_id]
    hybrid = vector_index.search(name, text="xylophone", embedding=query, top_k=5)
    assert needle.chunk_id in [h.chunk_id for h in hybrid]


def test_hybrid_order_is_reciprocal_rank_fusion_of_both_rankings(
    vector_index: MilvusIndex,
) -> None:
    from corral.vector_index import MIN_HYBRID_CANDIDATES, RRF_K

    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    vector_index.insert(name, _corpus(40))
    query, text, top_k = vector(11), "ledger harbor", 5
    depth = MIN_HYBRID_CANDIDATES
    dense = vector_index.search(name, text=text, embedding=query, top_k=depth, mode="dense")
    keyword = vector_index.search(name, text=text, embedding=query, top_k=depth, mode="keyword")
    fused: dict[str, float] = {}
    for ranking in (dense, keyword):
        for rank, hit in enumerate(ranking, start=1):
            fused[hit.chunk_id] = fused.get(hit.chunk_id, 0.0) + 1 / (RRF_K + rank)
    hybrid = vector_index.search(name, text=text, embedding=query, top_k=top_k)
    assert len(hybrid) == top_k
    scores = [h.score for h in hybrid]
    assert scores == sorted(scores, reverse=True)
    for hit in hybrid:
        assert hit.score == pytest.approx(fused[hit.chunk_id], rel=1e-4)
    best = sorted(fused.values(), reverse=True)[:top_k]
    assert scores == pytest.approx(best, rel=1e-4)


def test_metadata_filters_scalars_lists_and_and(vector_index: MilvusIndex) -> None:
    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    vector_index.insert(
        name,
        [
            chunk("a", 0, "alpha report", seed=1, lang="en", year=2023, draft=False),
            chunk("b", 0, "beta report", seed=2, lang="fr", year=2024, draft=True),
            chunk("c", 0, "gamma report", seed=3, lang="de", year=2024, draft=False),
        ],
    )

    def ids(metadata_filter: dict[str, object], mode: str = "hybrid") -> set[str]:
        hits = vector_index.search(
            name,
            text="report",
            embedding=vector(1),
            top_k=10,
            metadata_filter=metadata_filter,  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
        )
        return {h.document_uuid for h in hits}

    for mode in ("hybrid", "dense", "keyword"):
        assert ids({"lang": "fr"}, mode) == {"b"}
        assert ids({"year": 2024}, mode) == {"b", "c"}
        assert ids({"lang": ["en", "de"]}, mode) == {"a", "c"}
        assert ids({"year": 2024, "draft": False}, mode) == {"c"}
        assert ids({"lang": "en", "year": 2024}, mode) == set()
        assert ids({"missing_key": "x"}, mode) == set()


@pytest.mark.parametrize(
    "value",
    [
        '" or true or "',
        'fr") or (metadata["lang"] != "',
        "fr' or 'x' == 'x",
        "\\",
        '\\" or 1 == 1 or \\"',
        "fr\n) or (true",
        "%",
    ],
)
def test_filter_values_that_try_to_break_out_match_literally(
    vector_index: MilvusIndex, value: str
) -> None:
    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    vector_index.insert(
        name,
        [
            chunk("plain", 0, "some report", seed=1, lang="fr"),
            chunk("literal", 0, "some report", seed=2, lang=value),
        ],
    )
    hits = vector_index.search(
        name, text="report", embedding=vector(1), top_k=10, metadata_filter={"lang": value}
    )
    assert [h.document_uuid for h in hits] == ["literal"]


@pytest.mark.parametrize(
    "bad_filter",
    [
        {'lang"] == "x" or metadata["a': "x"},
        {"1abc": "x"},
        {"": "x"},
        {"a" * 65: "x"},
        {"lang": {"$ne": "x"}},
        {"lang": []},
        {"lang": float("nan")},
        {"lang": 2**63},
        {"lang": "nul\x00byte"},
        {"lang": "lone \ud800 surrogate"},
    ],
)
def test_bad_filters_are_invalid_requests(vector_index: MilvusIndex, bad_filter: dict) -> None:  # type: ignore[type-arg]
    from corral.errors import InvalidRequest

    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    with pytest.raises(InvalidRequest) as raised:
        vector_index.search(
            name, text="x", embedding=vector(1), top_k=3, metadata_filter=bad_filter
        )
    assert isinstance(raised.value, ValueError)


def test_delete_chunks_documents_and_list_chunk_ids(vector_index: MilvusIndex) -> None:
    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    vector_index.insert(
        name,
        [
            chunk("d1", 0, "one zero", seed=1),
            chunk("d1", 1, "one one", seed=2),
            chunk("d2", 0, "two zero", seed=3),
            chunk("d3", 0, "three zero", seed=4),
        ],
    )
    assert vector_index.chunk_ids(name, "d1") == ["d1:1:0", "d1:1:1"]
    assert vector_index.chunk_ids(name, 'd1" or document_uuid != "') == []
    vector_index.delete_chunks(name, ["d1:1:0", "no-such-chunk"])
    assert vector_index.chunk_ids(name, "d1") == ["d1:1:1"]
    vector_index.delete_documents(name, ["d1", "d2", "never-there"])
    assert vector_index.chunk_ids(name, "d1") == []
    assert vector_index.chunk_ids(name, "d2") == []
    hits = vector_index.search(name, text="zero", embedding=vector(1), top_k=10)
    assert [h.document_uuid for h in hits] == ["d3"]
    vector_index.delete_chunks(name, [])
    vector_index.delete_documents(name, [])


def test_insert_again_is_an_upsert_not_a_duplicate(vector_index: MilvusIndex) -> None:
    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    first = chunk("d", 0, "original words", seed=1)
    vector_index.insert(name, [first])
    vector_index.insert(name, [chunk("d", 0, "replacement words", seed=1)])
    hits = vector_index.search(name, text="words", embedding=vector(1), top_k=10)
    assert [(h.chunk_id, h.text) for h in hits] == [("d:1:0", "replacement words")]


def test_create_and_drop_are_idempotent(vector_index: MilvusIndex) -> None:
    name = collection_name()
    assert not vector_index.has_collection(name)
    vector_index.create_collection(name, dimension=DIM)
    vector_index.create_collection(name, dimension=DIM)
    assert vector_index.has_collection(name)
    vector_index.drop_collection(name)
    vector_index.drop_collection(name)
    assert not vector_index.has_collection(name)


def test_a_search_never_returns_another_collections_chunks(vector_index: MilvusIndex) -> None:
    mine, theirs = collection_name(), collection_name()
    for name in (mine, theirs):
        vector_index.create_collection(name, dimension=DIM)
    vector_index.insert(mine, [chunk("mine", 0, "shared secret words", seed=1)])
    vector_index.insert(theirs, [chunk("theirs", 0, "shared secret words", seed=1)])
    for mode in ("hybrid", "dense", "keyword"):
        hits = vector_index.search(
            mine,
            text="shared secret words",
            embedding=vector(1),
            top_k=10,
            mode=mode,  # type: ignore[arg-type]
        )
        assert {h.document_uuid for h in hits} == {"mine"}
    assert vector_index.chunk_ids(mine, "theirs") == []


def test_long_and_unicode_texts_round_trip(vector_index: MilvusIndex) -> None:
    from corral.errors import InvalidRequest
    from corral.vector_index import MAX_TEXT_BYTES

    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    long_text = ("naïve café résumé " * 4000)[: MAX_TEXT_BYTES // 2]
    vector_index.insert(name, [chunk("long", 0, long_text, seed=1)])
    hits = vector_index.search(name, text="café", embedding=vector(1), top_k=1, mode="keyword")
    assert hits[0].text == long_text
    too_long = "é" * (MAX_TEXT_BYTES // 2 + 1)  # within 65535 characters, over in bytes
    with pytest.raises(InvalidRequest, match="bytes of text"):
        vector_index.insert(name, [chunk("too-long", 0, too_long, seed=2)])
    assert vector_index.chunk_ids(name, "too-long") == []


def test_wrong_dimensions_are_refused_before_anything_is_written(
    vector_index: MilvusIndex,
) -> None:
    from corral.errors import InvalidRequest

    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    bad = ChunkRecord("x:1:0", "x", "text", 0, 4, embedding=[0.1] * (DIM + 1))
    with pytest.raises(InvalidRequest, match="dimension"):
        vector_index.insert(name, [chunk("x", 1, "fine", seed=1), bad])
    assert vector_index.chunk_ids(name, "x") == []
    with pytest.raises(InvalidRequest, match="dimension"):
        vector_index.search(name, text="t", embedding=[0.1] * 3, top_k=1, mode="dense")


def test_an_unreachable_milvus_is_backend_unavailable(tmp_path: object) -> None:
    import socket

    from corral.errors import BackendUnavailable, http_status_for

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    index = MilvusIndex(f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(BackendUnavailable) as raised:
        index.has_collection("corral_x")
    assert http_status_for(raised.value) == 503
    assert "unavailable" in raised.value.message


# -- no filter value can leave its literal ---------------------------------------------------

_scalars = (
    st.text(max_size=40)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
)
_filters = st.dictionaries(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    _scalars | st.lists(_scalars, min_size=1, max_size=4),
    min_size=1,
    max_size=4,
)


def _comparison(node: object, key: str) -> object:
    """The literal value of `metadata["key"] == literal`; fails on any other shape."""
    from milvus_lite.search.filter import ast

    assert isinstance(node, ast.CmpOp) and node.op == "=="
    assert isinstance(node.left, ast.PathAccess) and node.left.path == (key,)
    assert isinstance(node.left.base, ast.FieldRef) and node.left.base.name == "metadata"
    assert isinstance(node.right, ast.IntLit | ast.FloatLit | ast.StringLit | ast.BoolLit)
    return node.right.value


@settings(max_examples=200, deadline=None)
@given(_filters)
def test_any_filter_parses_to_exactly_its_equalities(metadata_filter: dict) -> None:  # type: ignore[type-arg]
    """Milvus Lite's own parser reads back one AND of one clause per key, each an
    equality (or an OR of equalities) with exactly the given values: no value can add
    an operator, a field or a clause."""
    from milvus_lite.search.filter import ast, parse_expr

    from corral.errors import InvalidRequest

    try:
        expression = filter_expression(metadata_filter)
    except InvalidRequest:
        return  # refused (control characters, lone surrogates): nothing reaches Milvus
    tree = parse_expr(expression)
    clauses = tree.operands if isinstance(tree, ast.And) else (tree,)
    assert len(clauses) == len(metadata_filter)
    for clause, (key, value) in zip(clauses, metadata_filter.items(), strict=True):
        wanted = value if isinstance(value, list) else [value]
        parts = clause.operands if isinstance(clause, ast.Or) else (clause,)
        got = [_comparison(part, key) for part in parts]
        assert len(got) == len(wanted)
        for g, w in zip(got, wanted, strict=True):
            assert type(g) is type(w) or isinstance(w, float)
            assert g == w


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(min_size=1, max_size=30))
def test_any_string_value_matches_only_itself_on_a_real_server(
    vector_index: MilvusIndex, value: str
) -> None:
    from corral.errors import InvalidRequest

    name = "corral_fuzz_filter"
    vector_index.create_collection(name, dimension=DIM)
    vector_index.delete_documents(name, ["decoy", "target"])
    vector_index.insert(
        name,
        [
            chunk("decoy", 0, "fuzz text", seed=1, v=value + "x"),
            chunk("target", 0, "fuzz text", seed=2, v=value),
        ],
    )
    try:
        hits = vector_index.search(
            name, text="fuzz", embedding=vector(1), top_k=5, metadata_filter={"v": value}
        )
    except InvalidRequest:
        return
    assert [h.document_uuid for h in hits] == ["target"]


@pytest.mark.slow
def test_the_embedded_index_restarts_a_server_that_died(tmp_path: Path) -> None:
    """build_vector_index's embedded index: the server killed under it comes back on the
    next call, with the bank's chunks (Milvus Lite keeps them on disk)."""
    from corral.config import Settings
    from corral.milvus_server import LocalMilvus
    from corral.vector_index import build_vector_index

    index = build_vector_index(Settings(home=tmp_path))
    local = LocalMilvus(tmp_path)
    try:
        name = collection_name()
        index.create_collection(name, dimension=DIM)
        index.insert(name, [chunk("kept", 0, "durable words", seed=1)])
        old = local.running()
        assert old is not None
        os.kill(old.pid, signal.SIGKILL)  # the server this test started, by its own pid
        hits = index.search(name, text="durable", embedding=vector(1), top_k=1)
        assert [h.document_uuid for h in hits] == ["kept"]
        new = local.running()
        assert new is not None and new.pid != old.pid and index.uri == new.uri
    finally:
        index.close()
        local.stop()
