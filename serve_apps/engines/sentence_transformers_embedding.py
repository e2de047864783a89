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

from serve_apps.engines.protocol import EmbeddingInfo, EngineRequestError
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
        tokenizer = model.tokenizer
        if not isinstance(tokenizer, PreTrainedTokenizerBase) or not tokenizer.is_fast:
            raise ValueError(
                f"the model in {config.model_dir} has no fast tokenizer: token spans need "
                "its character offsets"
            )
        dimension = model.get_embedding_dimension()
        if dimension is None or model.max_seq_length is None:
            raise ValueError(f"the model in {config.model_dir} declares no dimension or length")
        self._model = model.eval()
        self._tokenizer: PreTrainedTokenizerBase = tokenizer
        specials = tokenizer.num_special_tokens_to_add(pair=False)
        self._info = EmbeddingInfo(
            dimension=int(dimension), max_tokens=int(model.max_seq_length) - specials
        )

    @property
    def info(self) -> EmbeddingInfo:
        return self._info

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """[start, end) of each text token (special tokens left out), in order."""
        encoded = self._tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            truncation=False,
            verbose=False,  # longer than the model's length is the point of asking
        )
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]

    def check(self, text: str) -> None:
        """EngineRequestError for text with no tokens or more than `info.max_tokens`."""
        count = len(self.token_spans(text))
        if count == 0:
            raise EngineRequestError("the text to embed is empty (no tokens)")
        if count > self._info.max_tokens:
            raise EngineRequestError(
                f"the text is {count} tokens, longer than the embedding model's "
                f"{self._info.max_tokens}"
            )

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
