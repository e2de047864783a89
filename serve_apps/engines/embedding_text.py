"""What every embedding engine counts the same way, whatever runs the model: the text
tokens a fast tokenizer sees (their character spans, special tokens left out: what
chunking counts windows in), how many text tokens a model embeds whole (its sequence
length less the special tokens the tokenizer adds), and the refusal of text that has no
tokens or more than that. Imports no torch, so the vLLM env's engine shares it."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from serve_apps.engines.protocol import EngineRequestError


def fast_tokenizer(tokenizer: object, model_dir: object) -> PreTrainedTokenizerBase:
    """`tokenizer` if it is a fast one; ValueError otherwise (spans need its offsets)."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or not tokenizer.is_fast:
        raise ValueError(
            f"the model in {model_dir} has no fast tokenizer: token spans need its "
            "character offsets"
        )
    return tokenizer


def text_token_limit(tokenizer: PreTrainedTokenizerBase, sequence_length: int) -> int:
    """The most text tokens embedded whole in `sequence_length` model positions."""
    return sequence_length - tokenizer.num_special_tokens_to_add(pair=False)


def token_spans(tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    """[start, end) of each text token (special tokens left out), in order."""
    encoded = tokenizer(
        text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        truncation=False,
        verbose=False,  # longer than the model's length is the point of asking
    )
    return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]


def check_token_count(count: int, max_tokens: int) -> None:
    """EngineRequestError for text with no tokens or more than `max_tokens`."""
    if count == 0:
        raise EngineRequestError("the text to embed is empty (no tokens)")
    if count > max_tokens:
        raise EngineRequestError(
            f"the text is {count} tokens, longer than the embedding model's {max_tokens}"
        )
