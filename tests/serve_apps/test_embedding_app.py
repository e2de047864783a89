"""The embedding app: its config and early check without Serve (a fake engine), then the
session's real app (all-MiniLM-L6-v2 on Ray Serve) through the control plane's helpers:
vectors equal sentence-transformers in-process, concurrent texts meet in batches, info
and spans are the model's, and refusals are 422s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from corral.errors import InvalidRequest
from corral.services import model_calls
from serve_apps.embedding import (
    DEPLOYMENT_NAME,
    EmbeddingAppConfig,
    EmbeddingServer,
    build_app,
    engine_for,
    sentence_transformers_engine,
    vllm_embedding_engine,
)
from serve_apps.engines.protocol import EmbeddingInfo, EngineRequestError
from tests.conftest import EmbeddingApp
from tests.serve_apps.test_sentence_transformers_embedding import TOLERANCE, in_process


class LengthEngine:
    """A fake embedding engine: a word is a token; the vector is (1, 0) for text of
    even length, (0, 1) otherwise."""

    info = EmbeddingInfo(dimension=2, max_tokens=3)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], None
        for index, char in enumerate(f"{text} "):
            if char.isspace() and start is not None:
                spans.append((start, index))
                start = None
            elif not char.isspace() and start is None:
                start = index
        return spans

    def check(self, text: str) -> None:
        if not 0 < len(self.token_spans(text)) <= self.info.max_tokens:
            raise EngineRequestError("bad text")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [[1.0, 0.0] if len(t) % 2 == 0 else [0.0, 1.0] for t in texts]


def _config(**overrides: Any) -> EmbeddingAppConfig:
    return EmbeddingAppConfig.model_validate(
        {"name": "e", "model_dir": "/unused", "max_batch_size": 4} | overrides
    )


def test_a_bad_text_is_refused_before_it_joins_a_batch() -> None:
    server = EmbeddingServer(_config(), lambda _config: LengthEngine())
    with pytest.raises(EngineRequestError, match="bad text"):
        asyncio.run(server.embed("one two three four"))
    assert server.stats() == {"batch_sizes": []}
    assert server.info() == {"dimension": 2, "max_tokens": 3}
    assert asyncio.run(server.token_spans(" ab  c")) == [[1, 3], [5, 6]]


def test_config_and_deployment() -> None:
    with pytest.raises(ValueError):
        _config(adapter_dir="/adapter")  # nothing but weights and options
    with pytest.raises(ValueError):
        _config(score_weights={"a": 1.0})
    assert engine_for(_config()) is sentence_transformers_engine
    assert engine_for(_config(engine="vllm")) is vllm_embedding_engine
    app = build_app(_config().model_dump(), engine_factory=lambda c: LengthEngine())
    options = app._bound_deployment
    assert options.name == DEPLOYMENT_NAME
    assert options.max_ongoing_requests >= 4


# ------------------------------------------------------------------ on Ray Serve

TEXTS = [f"Document {i} talks about topic {i % 7} at some length." for i in range(40)]


@pytest.mark.integration
@pytest.mark.slow
def test_served_vectors_equal_the_model_in_process_and_batch(
    embedding_app: EmbeddingApp, embedding_model_dir: Path
) -> None:
    handle = embedding_app.handle()
    started = time.perf_counter()
    vectors = asyncio.run(model_calls.embed(handle, TEXTS))
    batched_s = time.perf_counter() - started
    np.testing.assert_allclose(
        np.array(vectors), in_process(embedding_model_dir, TEXTS), atol=TOLERANCE
    )
    stats = handle.stats.remote().result()
    assert max(stats["batch_sizes"]) > 1, stats
    single = []
    for text in TEXTS[:5]:
        started = time.perf_counter()
        asyncio.run(model_calls.embed(handle, [text]))
        single.append(time.perf_counter() - started)
    print(
        f"\nembedding latency: one text {np.median(single) * 1000:.1f} ms (median of 5); "
        f"{len(TEXTS)} texts together {batched_s * 1000:.0f} ms "
        f"({len(TEXTS) / batched_s:.0f} texts/s), batches {stats['batch_sizes'][-12:]}"
    )
    assert asyncio.run(model_calls.embed(handle, [])) == []


@pytest.mark.integration
@pytest.mark.slow
def test_info_and_spans_are_the_models(
    embedding_app: EmbeddingApp, embedding_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    handle = embedding_app.handle()
    info = asyncio.run(model_calls.embedding_info(handle))
    assert info == EmbeddingInfo(dimension=384, max_tokens=254)
    text = "Chunking counts tokens, unbelievably precisely."
    spans = asyncio.run(model_calls.token_spans(handle, text))
    tokens = AutoTokenizer.from_pretrained(embedding_model_dir).tokenize(text)
    assert [text[a:b].lower() for a, b in spans] == [t.removeprefix("##") for t in tokens]
    assert all(isinstance(span, tuple) for span in spans)


@pytest.mark.integration
@pytest.mark.slow
def test_text_the_model_cannot_embed_whole_is_a_422_naming_it(
    embedding_app: EmbeddingApp,
) -> None:
    handle = embedding_app.handle()
    too_long = " ".join(["word"] * 255)
    with pytest.raises(InvalidRequest, match=r"text 1: the text is 255 tokens, longer than"):
        asyncio.run(model_calls.embed(handle, ["fine", too_long, "also fine"]))
    with pytest.raises(InvalidRequest, match="text 0: the text to embed is empty"):
        asyncio.run(model_calls.embed(handle, [""]))
    # The replica is unharmed.
    assert len(asyncio.run(model_calls.embed(handle, ["fine"]))[0]) == 384
