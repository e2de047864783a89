"""The default embedding engine: a sentence-transformers model (transformer, pooling,
normalisation modules as its `modules.json` says) from a local directory, on CPU or GPU.

Vectors are `encode(texts, normalize_embeddings=True)`, unit length, so cosine
similarity is their dot product. The model truncates its input at `max_seq_length`
tokens counted with the special tokens its tokenizer adds ([CLS] and [SEP] for BERT), so
the most text tokens it embeds whole, `info.max_tokens`, is that length less those
special tokens; `check` refuses longer text rather than embedding a silent prefix of it.
`token_spans` are the fast tokenizer's character offsets of those same text tokens,
which is what chunking counts its windows in.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedTokenizerBase

from serve_apps.engines.embedding_text import (
    check_token_count,
    fast_tokenizer,
    text_token_limit,
    token_spans,
)
from serve_apps.engines.protocol import EmbeddingInfo
from serve_apps.engines.transformers_engine import resolve_placement


@dataclass(frozen=True)
class SentenceTransformersEngineConfig:
    model_dir: Path
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or float32 | bfloat16 | float16


class SentenceTransformersEmbeddingEngine:
    """Embeds texts with a sentence-transformers model loaded from a local directory."""

    def __init__(self, config: SentenceTransformersEngineConfig) -> None:
        device, dtype = resolve_placement(config.device, config.dtype)
        model = SentenceTransformer(
            str(config.model_dir),
            device=device,
            local_files_only=True,
            model_kwargs={"dtype": dtype},
        )
        tokenizer = fast_tokenizer(model.tokenizer, config.model_dir)
        dimension = model.get_embedding_dimension()
        if dimension is None or model.max_seq_length is None:
            raise ValueError(f"the model in {config.model_dir} declares no dimension or length")
        self._model = model.eval()
        self._tokenizer: PreTrainedTokenizerBase = tokenizer
        self._info = EmbeddingInfo(
            dimension=int(dimension),
            max_tokens=text_token_limit(tokenizer, int(model.max_seq_length)),
        )

    @property
    def info(self) -> EmbeddingInfo:
        return self._info

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return token_spans(self._tokenizer, text)

    def check(self, text: str) -> None:
        check_token_count(len(self.token_spans(text)), self._info.max_tokens)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One batch, vectors in text order."""
        if not texts:
            return []
        for text in texts:
            self.check(text)
        with torch.inference_mode():
            vectors = self._model.encode(
                list(texts),
                batch_size=len(texts),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        rows: list[list[float]] = vectors.astype("float32").tolist()
        return rows
