"""Memory bank benchmark: what Corral's memory bank API costs over pymilvus by hand, on
the same data, the same embedding app and the same Milvus server, in one run.

- Corral: `/memory_banks/create` then `/memory_bank/insert` (documents decoded, chunked,
  embedded on the Serve embedding app, stored in SQL and Milvus), and `POST
  /memory_bank/query` (hybrid search) for every question of the labelled corpus.
- raw pymilvus: the same chunk windows (the same chunker over the same app's token
  spans), the same embeddings (the same app, texts sent together so it batches), a
  collection with the same schema (dense + Milvus's BM25 function), `insert`, and
  `hybrid_search` (RRF, k 60) with the question embedded on the app.
- Milvus alone: the raw path with every embedding computed beforehand, i.e. what the
  Milvus server itself takes.

    python bench/memory.py [--quick] [--chunk-tokens 96] [--overlap-tokens 24]

It starts a private Ray cluster (the real all-MiniLM-L6-v2 embedding app on CPU) and a
private `milvus-lite server`, and calls the API in this process (FastAPI's test client),
like bench/reward.py. The corpus is bench/data/memory_corpus.jsonl with its questions;
recall@3 counts a question found when its document is among the top 3 chunks.
The last line, `RESULT {...}`, carries the figures as JSON.

Measured 2026-12-01 (defaults: 48 documents -> 99 chunks of 96 tokens, 24 overlapping;
49 questions x 2; MiniLM on CPU, one replica with one CPU; a shared 2-core machine under
other load, so the figures move by tens of percent between runs):

                 insert docs/s  queries/s  p50 ms  p99 ms  recall@3
    Corral API             5.9       10.0    94.5   206.9     0.980
    raw pymilvus           5.6       10.3    92.9   194.6     0.959
    Milvus alone          43.2       26.8    34.8   136.1   (embeddings precomputed)

Corral / raw: insert 1.05x (Corral embeds a request's chunks together; by hand, one
document at a time), query 0.98x. Embedding dominates both: Milvus alone is 7x faster
at inserting. Corral's recall is higher because the service over-fetches (to drop stale
document versions), which gives reciprocal-rank fusion more candidates."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from fastapi.testclient import TestClient
from ray import serve
from ray.serve.handle import DeploymentHandle

from corral.app import create_app
from corral.config import Settings
from corral.memory.chunking import chunk_windows
from corral.memory.documents import decode_document
from corral.memory.evaluation import LabelledCorpus, load_corpus, recall_at_k
from corral.milvus_server import LocalMilvus
from corral.serving.catalog import default_embedding_model_dir
from corral.store import migrate
from corral.vector_index import MilvusIndex
from serve_apps.embedding import build_app

DATA = Path(__file__).resolve().parent / "data"
TOP_K = 3
INSERT_BATCH_DOCUMENTS = 8


class OneModel:
    """Every model name resolves to the one embedding app (all this bench serves)."""

    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self.handle = handle

    def handle_for(self, *, tenant: str, model: str, kind: str = "llm") -> DeploymentHandle[Any]:
        return self.handle


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_figures(latencies: list[float], wall_s: float) -> dict[str, float]:
    return {
        "queries_per_s": len(latencies) / wall_s,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def timed(calls: Sequence[Callable[[], list[str]]]) -> tuple[list[list[str]], list[float], float]:
    """Run each call one after another; their results, latencies and the total time."""
    results, latencies = [], []
    start = time.perf_counter()
    for call in calls:
        began = time.perf_counter()
        results.append(call())
        latencies.append(time.perf_counter() - began)
    return results, latencies, time.perf_counter() - start


# -- Corral ---------------------------------------------------------------------------


def corral_run(
    client: TestClient, corpus: LabelledCorpus, *, repeats: int
) -> tuple[dict[str, Any], list[list[str]]]:
    bank = str(uuid.uuid4())
    docs = [doc.spec_document() for doc in corpus.documents]
    start = time.perf_counter()
    created = client.post(
        "/memory_banks/create", params={"bank_uuid": bank, "bank_name": "bench"}, json=[]
    )
    created.raise_for_status()
    for offset in range(0, len(docs), INSERT_BATCH_DOCUMENTS):
        response = client.post(
            "/memory_bank/insert",
            params={"bank_uuid": bank},
            json=docs[offset : offset + INSERT_BATCH_DOCUMENTS],
        )
        response.raise_for_status()
    insert_s = time.perf_counter() - start

    def query(text: str) -> Callable[[], list[str]]:
        def call() -> list[str]:
            body = {"bank_uuid": bank, "query": text, "top_k": TOP_K}
            response = client.post("/memory_bank/query", json=body)
            response.raise_for_status()
            return [chunk["document_uuid"] for chunk in response.json()["chunks"]]

        return call

    calls = [query(q.question) for q in corpus.questions] * repeats
    query("warm-up")()
    rankings, latencies, wall = timed(calls)
    client.delete("/memory_banks/drop", params={"bank_uuid": bank}).raise_for_status()
    return {"insert_s": insert_s} | latency_figures(latencies, wall), rankings


# -- raw pymilvus ---------------------------------------------------------------------


def raw_schema(client: Any, dimension: int) -> tuple[Any, Any]:
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("document_uuid", DataType.VARCHAR, max_length=512)
    schema.add_field("text", DataType.VARCHAR, max_length=65_535, enable_analyzer=True)
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
    index = client.prepare_index_params()
    index.add_index(field_name="dense", index_type="FLAT", metric_type="COSINE")
    index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    return schema, index


def embed(handle: DeploymentHandle[Any], texts: Sequence[str]) -> list[list[float]]:
    """All texts sent at once (the replica batches them), as a pymilvus user would."""
    responses = [handle.embed.remote(text) for text in texts]
    return [response.result() for response in responses]


def raw_chunks(
    handle: DeploymentHandle[Any], corpus: LabelledCorpus, size: int, overlap: int
) -> list[dict[str, Any]]:
    """The rows Corral would store: the same decoding, token spans, windows, embeddings."""
    rows = []
    for doc in corpus.documents:
        text = decode_document(doc.content, doc.mime_type, max_bytes=1 << 24)
        spans = [(s, e) for s, e in handle.token_spans.remote(text).result()]
        windows = chunk_windows(spans, size=size, overlap=overlap)
        vectors = embed(handle, [text[s:e] for s, e in windows])
        rows += [
            {
                "chunk_id": f"{doc.uuid}:1:{i}",
                "document_uuid": doc.uuid,
                "text": text[s:e],
                "start": s,
                "end": e,
                "metadata": doc.metadata,
                "dense": vector,
            }
            for i, ((s, e), vector) in enumerate(zip(windows, vectors, strict=True))
        ]
    return rows


def raw_run(
    uri: str,
    handle: DeploymentHandle[Any],
    corpus: LabelledCorpus,
    *,
    size: int,
    overlap: int,
    repeats: int,
    precomputed: list[dict[str, Any]] | None,
) -> tuple[dict[str, Any], list[list[str]], list[dict[str, Any]]]:
    """pymilvus by hand; with `precomputed` rows and question vectors, Milvus alone."""
    from pymilvus import AnnSearchRequest, RRFRanker

    from corral.milvus_client import open_client

    client = open_client(uri)
    name = "raw_" + uuid.uuid4().hex
    dimension = len(embed(handle, ["dimension"])[0])
    start = time.perf_counter()
    schema, index = raw_schema(client, dimension)
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    rows = precomputed if precomputed is not None else raw_chunks(handle, corpus, size, overlap)
    for offset in range(0, len(rows), 256):
        client.insert(name, rows[offset : offset + 256])
    insert_s = time.perf_counter() - start

    questions = [q.question for q in corpus.questions]
    vectors = embed(handle, questions) if precomputed else None

    def query(position: int) -> Callable[[], list[str]]:
        def call() -> list[str]:
            text = questions[position]
            vector = vectors[position] if vectors is not None else embed(handle, [text])[0]
            requests = [
                AnnSearchRequest([vector], "dense", {"metric_type": "COSINE"}, limit=20),
                AnnSearchRequest([text], "sparse", {"metric_type": "BM25"}, limit=20),
            ]
            hits = client.hybrid_search(
                name,
                requests,
                RRFRanker(60),
                limit=TOP_K,
                output_fields=["document_uuid", "text", "start", "end", "metadata"],
                consistency_level="Strong",
            )
            return [hit["entity"]["document_uuid"] for hit in hits[0]]

        return call

    calls = [query(i) for i in range(len(questions))] * repeats
    query(0)()
    rankings, latencies, wall = timed(calls)
    client.drop_collection(name)
    client.close()
    return {"insert_s": insert_s} | latency_figures(latencies, wall), rankings, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk-tokens", type=int, default=96)
    parser.add_argument("--overlap-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the questions")
    parser.add_argument("--quick", action="store_true", help="12 documents, one pass")
    args = parser.parse_args()
    corpus = load_corpus(DATA / "memory_corpus.jsonl", DATA / "memory_questions.jsonl")
    if args.quick:
        args.repeats = 1
        kept = corpus.documents[:12]
        uuids = {doc.uuid for doc in kept}
        corpus = LabelledCorpus(
            documents=kept, questions=[q for q in corpus.questions if q.document_uuid in uuids]
        )

    work = Path(tempfile.mkdtemp(prefix="corral-bench-memory-"))
    milvus = LocalMilvus(work / "milvus-home")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(Path(tempfile.mkdtemp(prefix="cbm-", dir="/tmp"))),
    )
    try:
        uri = milvus.ensure()
        serve.start(proxy_location="Disabled")
        handle = serve.run(
            build_app(
                {
                    "name": "bench-embedding",
                    "model_dir": str(default_embedding_model_dir()),
                    "device": "cpu",
                    "cpus_per_replica": 1,
                    "max_batch_size": 32,
                    "batch_wait_timeout_s": 0.005,
                    "max_queued_requests": 1024,
                }
            ),
            name="embedding-bench",
            route_prefix=None,
        )
        settings = Settings(
            home=work / "home",
            milvus_uri=uri,
            memory_chunk_tokens=args.chunk_tokens,
            memory_chunk_overlap_tokens=args.overlap_tokens,
        )
        migrate.upgrade(settings.resolved_database_url)
        index = MilvusIndex(uri)
        app = create_app(settings, model_router=OneModel(handle), vector_index=index)
        with TestClient(app) as client:
            corral, corral_rankings = corral_run(client, corpus, repeats=args.repeats)
        index.close()
        raw, raw_rankings, rows = raw_run(
            uri,
            handle,
            corpus,
            size=args.chunk_tokens,
            overlap=args.overlap_tokens,
            repeats=args.repeats,
            precomputed=None,
        )
        alone, _, _ = raw_run(
            uri,
            handle,
            corpus,
            size=args.chunk_tokens,
            overlap=args.overlap_tokens,
            repeats=args.repeats,
            precomputed=rows,
        )
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        milvus.stop()
        shutil.rmtree(work, ignore_errors=True)

    expected = [q.document_uuid for q in corpus.questions] * args.repeats
    documents, chunks = len(corpus.documents), len(rows)
    for run in (corral, raw, alone):
        run["documents_per_s"] = documents / run["insert_s"]
        run["chunks_per_s"] = chunks / run["insert_s"]
    figures = {
        "documents": documents,
        "chunks": chunks,
        "questions": len(corpus.questions),
        "chunk_tokens": args.chunk_tokens,
        "overlap_tokens": args.overlap_tokens,
        "corral": corral | {"recall_at_3": recall_at_k(corral_rankings, expected, k=TOP_K)},
        "raw_pymilvus": raw | {"recall_at_3": recall_at_k(raw_rankings, expected, k=TOP_K)},
        "milvus_alone": alone,
        "insert_ratio": corral["documents_per_s"] / raw["documents_per_s"],
        "query_ratio": corral["queries_per_s"] / raw["queries_per_s"],
    }
    print(
        f"{documents} documents -> {chunks} chunks of {args.chunk_tokens} tokens "
        f"({args.overlap_tokens} overlap); {len(corpus.questions)} questions x {args.repeats}; "
        "all-MiniLM-L6-v2 on CPU (one replica), milvus-lite server"
    )
    print("                     insert docs/s  queries/s  p50 ms  p99 ms  recall@3")
    for label, key in (("Corral API", "corral"), ("raw pymilvus", "raw_pymilvus")):
        f = figures[key]
        print(
            f"{label:20} {f['documents_per_s']:13.1f} {f['queries_per_s']:10.1f} "
            f"{f['p50_ms']:7.1f} {f['p99_ms']:7.1f} {f['recall_at_3']:9.3f}"
        )
    print(
        f"{'Milvus alone':20} {alone['documents_per_s']:13.1f} {alone['queries_per_s']:10.1f} "
        f"{alone['p50_ms']:7.1f} {alone['p99_ms']:7.1f}   (embeddings precomputed)"
    )
    print(
        f"Corral / raw: insert {figures['insert_ratio']:.2f}x, query {figures['query_ratio']:.2f}x"
    )
    print("RESULT " + json.dumps(figures))


if __name__ == "__main__":
    main()
