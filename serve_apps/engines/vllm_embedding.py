"""The vLLM embedding engine: a sentence-transformers model directory on vLLM's pooling
runner (`runner="pooling"`, `LLM.embed`), behind the same `EmbeddingEngine` protocol as
the sentence-transformers one (serve_apps.engines.sentence_transformers_embedding). vLLM
reads the directory's pooling and normalisation modules itself (`modules.json`), so the
vectors are the same ones: unit length, mean-pooled for MiniLM. The engines agree on
what a text is, too: the same tokenizer counts its tokens and spans
(serve_apps.engines.embedding_text), and the sequence length is the one
sentence-transformers truncates at (`sentence_bert_config.json`), so text that fits is
embedded whole by both. It runs only in the vLLM env (serve_apps.vllm_env)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from vllm import LLM, PoolingParams, TokensPrompt

from serve_apps.engines.embedding_text import (
    check_token_count,
    fast_tokenizer,
    text_token_limit,
    token_spans,
)
from serve_apps.engines.protocol import EmbeddingInfo
from serve_apps.engines.transformers_engine import resolve_placement


@dataclass(frozen=True)
class VLLMEmbeddingEngineConfig:
    model_dir: Path
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    cpu_kv_cache_bytes: int = 64 << 20  # see VLLMEngineConfig; an encoder keeps little


class VLLMEmbeddingEngine:
    def __init__(self, config: VLLMEmbeddingEngineConfig) -> None:
        device, dtype = resolve_placement(config.device, config.dtype)
        self._tokenizer: PreTrainedTokenizerBase = fast_tokenizer(
            AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True),
            config.model_dir,
        )
        sequence_length = _sequence_length(config.model_dir)
        self._llm = LLM(
            model=str(config.model_dir),
            runner="pooling",
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=sequence_length,
            enforce_eager=device == "cpu",
            kv_cache_memory_bytes=config.cpu_kv_cache_bytes if device == "cpu" else None,
            disable_log_stats=True,
            seed=0,
        )
        # The vector's length is what the model's modules make of it (a Dense module may
        # change it): asked of the model once rather than read off its config.
        (probe,) = self._run([self._ids("dimension")])
        self._info = EmbeddingInfo(
            dimension=len(probe), max_tokens=text_token_limit(self._tokenizer, sequence_length)
        )

    @property
    def info(self) -> EmbeddingInfo:
        return self._info

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return token_spans(self._tokenizer, text)

    def check(self, text: str) -> None:
        check_token_count(len(self.token_spans(text)), self._info.max_tokens)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        for text in texts:
            self.check(text)
        return self._run([self._ids(text) for text in texts])

    def _ids(self, text: str) -> list[int]:
        # With the special tokens, as sentence-transformers encodes it.
        ids: list[int] = self._tokenizer(text, return_attention_mask=False)["input_ids"]
        return ids

    def _run(self, batch: list[list[int]]) -> list[list[float]]:
        outputs = self._llm.embed(
            [TokensPrompt(prompt_token_ids=ids) for ids in batch],
            # The activation of an embedding is its normalisation: unit vectors.
            pooling_params=PoolingParams(use_activation=True),
            use_tqdm=False,
        )
        return [[float(x) for x in output.outputs.embedding] for output in outputs]


def _sequence_length(model_dir: Path) -> int:
    """The positions sentence-transformers embeds (its `max_seq_length`), else the
    model's own."""
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        length = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    return int(AutoConfig.from_pretrained(model_dir, local_files_only=True).max_position_embeddings)
