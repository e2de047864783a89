"""The vLLM reward engine: a sequence-classification reward model on vLLM's pooling
runner (`runner="pooling"`, `LLM.classify`), behind the same `ScoringEngine` protocol as
the transformers one (serve_apps.engines.transformers_reward), scoring the same text:
the conversation as the model's chat template renders it, the head read at its last
token, raw logits (no activation) weighted into one score. It runs only in the vLLM env
(serve_apps.vllm_env). A sync engine: the reward app's batch queue feeds it, and vLLM
schedules each batch's conversations together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from vllm import LLM, PoolingParams, TokensPrompt

from serve_apps.engines.labels import label_weights
from serve_apps.engines.protocol import EngineRequestError, ScoringRequest
from serve_apps.engines.transformers_engine import resolve_placement
from serve_apps.engines.transformers_reward import ROLES


@dataclass(frozen=True)
class VLLMRewardEngineConfig:
    model_dir: Path
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    score_weights: Mapping[str, float] | None = None
    max_context: int | None = None  # default: the model's max_position_embeddings
    cpu_kv_cache_bytes: int = 256 << 20  # see VLLMEngineConfig


class VLLMRewardEngine:
    def __init__(self, config: VLLMRewardEngineConfig) -> None:
        device, dtype = resolve_placement(config.device, config.dtype)
        self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            config.model_dir, local_files_only=True
        )
        hf_config = AutoConfig.from_pretrained(config.model_dir, local_files_only=True)
        labels = {int(i): str(label) for i, label in (hf_config.id2label or {}).items()}
        self._weights = label_weights(labels, config.score_weights)
        self._max_context = config.max_context or int(hf_config.max_position_embeddings)
        self._llm = LLM(
            model=str(config.model_dir),
            runner="pooling",
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=self._max_context,
            enforce_eager=device == "cpu",
            kv_cache_memory_bytes=config.cpu_kv_cache_bytes if device == "cpu" else None,
            disable_log_stats=True,
            seed=0,
        )

    def check(self, request: ScoringRequest) -> None:
        self._checked_ids(request)

    def score(self, requests: Sequence[ScoringRequest]) -> list[float]:
        if not requests:
            return []
        prompts = [TokensPrompt(prompt_token_ids=self._checked_ids(r)) for r in requests]
        outputs = self._llm.classify(
            prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False
        )
        return [_weighted(output.outputs.probs, self._weights) for output in outputs]

    def _checked_ids(self, request: ScoringRequest) -> list[int]:
        # The transformers reward engine's checks, in the same words.
        if not request.messages:
            raise EngineRequestError("a conversation to score needs at least one message")
        for message in request.messages:
            if message.role not in ROLES:
                raise EngineRequestError(
                    f"role {message.role[:50]!r} cannot be scored (roles: "
                    f"{', '.join(sorted(ROLES))})"
                )
        messages: list[dict[str, Any]] = [
            {"role": message.role, "content": message.content} for message in request.messages
        ]
        try:
            text = self._tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # the template's own raise_exception, a jinja error
            raise EngineRequestError(f"the chat template refused the conversation: {exc}") from None
        ids: list[int] = self._tokenizer(
            text, add_special_tokens=False, return_attention_mask=False
        )["input_ids"]
        if len(ids) > self._max_context:
            raise EngineRequestError(
                f"the conversation is {len(ids)} tokens, longer than the reward model's "
                f"{self._max_context}"
            )
        return ids


def _weighted(logits: Sequence[float], weights: Sequence[float]) -> float:
    # `probs` holds the raw logits here: the activation is off (use_activation=False).
    return float(sum(float(x) * w for x, w in zip(logits, weights, strict=True)))
