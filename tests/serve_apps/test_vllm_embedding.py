"""The embedding kind on vLLM's pooling runner, its replica in the vLLM env, against the
sentence-transformers engine on the same model and texts: the embedded default's real
all-MiniLM-L6-v2, which vLLM runs as a BERT encoder with the directory's own mean pooling
and normalisation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps.embedding import EmbeddingAppConfig, build_app
from serve_apps.engines.protocol import EngineRequestError
from serve_apps.engines.sentence_transformers_embedding import (
    SentenceTransformersEmbeddingEngine,
    SentenceTransformersEngineConfig,
)
from tests.serve_apps.vllm_env import vllm_python_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Both fp32 on CPU, different kernels: equal to rounding (seen: 3e-8).
COMPONENT_TOLERANCE = 1e-5
TEXTS = [
    "The capital of France is Paris.",
    "Bananas are rich in potassium.",
    "Ray Serve scales each model's replicas on demand.",
    "hello",
]


@pytest.fixture(scope="module")
def vllm_embedding_app(
    serve_instance: None, embedding_model_dir: Path
) -> Iterator[DeploymentHandle]:
    python = vllm_python_or_skip()
    config = {
        "name": "vllm-minilm",
        "model_dir": str(embedding_model_dir),
        "engine": "vllm",
        "device": "cpu",
        "vllm_python": str(python),
        "cpus_per_replica": 0.25,
    }
    app_name = f"embedding-{EmbeddingAppConfig.model_validate(config).name}"
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    try:
        yield handle
    finally:
        serve.delete(app_name)


@pytest.fixture(scope="module")
def reference(embedding_model_dir: Path) -> SentenceTransformersEmbeddingEngine:
    return SentenceTransformersEmbeddingEngine(
        SentenceTransformersEngineConfig(model_dir=embedding_model_dir, device="cpu")
    )


def test_vectors_match_the_sentence_transformers_engine(
    vllm_embedding_app: DeploymentHandle, reference: SentenceTransformersEmbeddingEngine
) -> None:
    expected = reference.embed(TEXTS)
    # Concurrent calls: the replica's batch queue hands vLLM several at once.
    responses = [vllm_embedding_app.embed.remote(text) for text in TEXTS]
    ours = [response.result() for response in responses]
    for vector, want in zip(ours, expected, strict=True):
        assert len(vector) == len(want) == 384
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, abs_tol=1e-5)
        assert max(abs(a - b) for a, b in zip(vector, want, strict=True)) < COMPONENT_TOLERANCE
    # Different texts, different vectors: the tolerance is not met by a constant.
    assert ours[0] != ours[1]


def test_info_and_spans_are_the_other_engines(
    vllm_embedding_app: DeploymentHandle, reference: SentenceTransformersEmbeddingEngine
) -> None:
    info = vllm_embedding_app.info.remote().result()
    assert info == {"dimension": 384, "max_tokens": reference.info.max_tokens}
    text = "Milvus holds memory banks."
    spans = vllm_embedding_app.token_spans.remote(text).result()
    assert spans == [list(span) for span in reference.token_spans(text)]


def test_text_that_does_not_fit_is_refused(
    vllm_embedding_app: DeploymentHandle, reference: SentenceTransformersEmbeddingEngine
) -> None:
    with pytest.raises(EngineRequestError, match="empty"):
        vllm_embedding_app.embed.remote("").result()
    too_long = "word " * (reference.info.max_tokens + 1)
    with pytest.raises(EngineRequestError, match="longer than the embedding model's"):
        vllm_embedding_app.embed.remote(too_long).result()
