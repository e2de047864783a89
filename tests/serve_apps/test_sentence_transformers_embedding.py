"""The sentence-transformers embedding engine on the real all-MiniLM-L6-v2: vectors equal
the model's own `encode(normalize_embeddings=True)`, batched or not; spans are the
tokenizer's text tokens; text it would truncate, or empty text, is refused."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from serve_apps.engines.protocol import EmbeddingEngine, EngineRequestError
from serve_apps.engines.sentence_transformers_embedding import (
    SentenceTransformersEmbeddingEngine,
    SentenceTransformersEngineConfig,
)

pytestmark = pytest.mark.slow  # loading sentence-transformers and torch: ~20 s

TOLERANCE = 1e-5
TEXTS = [
    "Ray Serve batches requests to one replica.",
    "Milvus stores vectors; BM25 scores keywords.",
    "A résumé, naïve café — unicode survives.",
    "short",
]


def in_process(model_dir: Path, texts: list[str]) -> np.ndarray:
    """What a user of sentence-transformers would compute, one text at a time."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return np.stack([model.encode([text], normalize_embeddings=True)[0] for text in texts])


@pytest.fixture(scope="module")
def engine(embedding_model_dir: Path) -> SentenceTransformersEmbeddingEngine:
    return SentenceTransformersEmbeddingEngine(
        SentenceTransformersEngineConfig(model_dir=embedding_model_dir, device="cpu")
    )


def test_vectors_equal_the_model_in_process_batched_or_not(
    engine: SentenceTransformersEmbeddingEngine, embedding_model_dir: Path
) -> None:
    assert isinstance(engine, EmbeddingEngine)
    expected = in_process(embedding_model_dir, TEXTS)
    batched = np.array(engine.embed(TEXTS))
    alone = np.array([engine.embed([text])[0] for text in TEXTS])
    assert batched.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(batched, expected, atol=TOLERANCE)
    np.testing.assert_allclose(alone, expected, atol=TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=TOLERANCE)
    assert engine.embed([]) == []


def test_info_is_the_models_dimension_and_length_less_its_special_tokens(
    engine: SentenceTransformersEmbeddingEngine,
) -> None:
    # max_seq_length 256 counts [CLS] and [SEP].
    assert (engine.info.dimension, engine.info.max_tokens) == (384, 254)


def test_spans_slice_the_text_back_to_its_tokens(
    engine: SentenceTransformersEmbeddingEngine, embedding_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedding_model_dir, local_files_only=True)
    text = "Tokenizers split unbelievably long words, and punctuation!"
    spans = engine.token_spans(text)
    tokens = tokenizer.tokenize(text)
    assert len(spans) == len(tokens)
    assert [text[start:end].lower() for start, end in spans] == [
        token.removeprefix("##") for token in tokens
    ]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert engine.token_spans("") == []


def test_text_it_would_truncate_or_empty_text_is_refused(
    engine: SentenceTransformersEmbeddingEngine,
) -> None:
    longest = " ".join(["word"] * engine.info.max_tokens)
    engine.check(longest)
    assert len(engine.embed([longest])[0]) == 384
    with pytest.raises(EngineRequestError, match=r"255 tokens, longer than .* 254"):
        engine.check(longest + " word")
    with pytest.raises(EngineRequestError, match="longer than"):
        engine.embed(["fine", longest + " word"])
    for empty in ("", "   \n"):
        with pytest.raises(EngineRequestError, match="empty"):
            engine.check(empty)
