"""The default generation engine: a transformers causal LM on CPU or GPU, with its own
decode loop.

One decode loop, `TransformersBatch`, serves a replica's scheduler (rows join and leave
between steps: continuous batching), `generate` (a batch that all join at once) and
`stream` (a batch of one): prefill the left-padded prompts into a `DynamicCache`, then
feed one token per row per step. Each row samples with its own options and its own seeded
`torch.Generator`, and leaves the batch (and its cache rows) as soon as it stops, so a
long answer never holds a short one back.

Numbers this engine gives (documented choices):
- `logprobs` are the chosen token's log-probability under the model's raw distribution
  (log-softmax of the logits at temperature 1, before top-k/top-p), as vLLM reports them
  by default; so they are the same whether the token was picked greedily or sampled.
- `max_tokens <= 0` means "as many as the context window leaves". The stop token counts
  towards `max_tokens`.
- Greedy output of a batch equals each request run alone, up to floating-point: padding
  and batch size change matmul shapes and attention kernels (a lone unpadded prompt needs
  no mask), so logits can differ in the last bits; where two tokens tie to that precision
  (rare in fp32, likelier in bf16) a batched row can take the other one and then diverge.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    DynamicLayer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from serve_apps.engines.protocol import (
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    RowStep,
    SamplingOptions,
    StopReason,
    TokenDelta,
)

# Llama 3's stop tokens and what each means; any other end-of-sequence id of the model
# (from its generation config) ends the turn.
LLAMA3_STOP_TOKENS: Final = {
    "<|eot_id|>": StopReason.END_OF_TURN,
    "<|eom_id|>": StopReason.END_OF_MESSAGE,
    "<|end_of_text|>": StopReason.END_OF_TURN,
}
_DEVICES: Final = ("auto", "cpu", "cuda")
_DTYPES: Final = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_REPLACEMENT_CHAR: Final = "\ufffd"
_PEFT_DEPRECATION: Final = "`is_gradient_checkpointing` is deprecated"


class InvalidRequestError(EngineRequestError):
    """A request the engine cannot run: an empty prompt, a prompt that leaves no room in
    the context window, or sampling options out of range. Raised before any work."""


@dataclass(frozen=True)
class TransformersEngineConfig:
    model_dir: Path
    adapter_dir: Path | None = None  # a peft (LoRA/DoRA) adapter over model_dir, merged
    device: str = "auto"  # auto | cpu | cuda; auto with several GPUs spreads the model
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or float32 | bfloat16 | float16
    max_context: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0  # seeds requests that bring no seed of their own

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be at least 2")


def stop_token_reasons(
    tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int] = ()
) -> dict[int, StopReason]:
    """Map each stop token id to its StopReason: Llama 3's tokens by name, then any other
    end-of-sequence id (the model's, the tokenizer's) as the end of a turn."""
    reasons: dict[int, StopReason] = {}
    vocabulary = tokenizer.get_vocab()
    for token, reason in LLAMA3_STOP_TOKENS.items():
        if token in vocabulary:
            reasons[vocabulary[token]] = reason
    extra = [*eos_token_ids, tokenizer.eos_token_id]
    for token_id in extra:
        if isinstance(token_id, int):
            reasons.setdefault(token_id, StopReason.END_OF_TURN)
    if not reasons:
        raise ValueError("the tokenizer has no stop token: no Llama 3 tokens and no eos token")
    return reasons


@dataclass
class _Row:
    """One request's progress through the decode loop."""

    prompt_ids: list[int]
    sampling: SamplingOptions
    budget: int  # how many tokens it may generate in all, stop token included
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: StopReason | None = None
    generator: torch.Generator | None = None  # made on the logits' device at first use

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never end inside a UTF-8
    character: the ids since the last emitted text are decoded together with a few ids
    before them (as vLLM does), and the new suffix is held back while it ends in U+FFFD."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] give the context text
        self._read_offset = 0  # ids from here on are not emitted yet
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" while a character is partial)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = text[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.emitted += delta
        return delta

    def finish(self, full_text: str) -> str:
        """The rest of `full_text` (the decode of all ids) not emitted yet: held-back bytes
        of a character that generation cut short come out here, as U+FFFD."""
        delta = full_text[len(self.emitted) :]
        self.emitted += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return _text_of(self._tokenizer, ids)


def _text_of(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    # Special tokens such as <|python_tag|> stay: the tool-call parser needs them. Space
    # clean-up is a WordPiece habit that corrupts byte-level BPE text; never apply it.
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert isinstance(text, str)
    return text


def resolve_placement(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """The device and dtype a replica loads its model with: `auto` is CUDA when one is
    visible (bfloat16 there, float32 on CPU); ValueError for CUDA asked for but absent."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is visible")
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else torch.float32
    return device, _DTYPES[dtype]


class TransformersEngine:
    """Generates with a transformers causal LM loaded from a local directory."""

    def __init__(self, config: TransformersEngineConfig) -> None:
        self.config = config
        device, dtype = resolve_placement(config.device, config.dtype)
        # One replica over all of its GPUs (layers split across them) when it has several.
        spread = config.device == "auto" and device == "cuda" and torch.cuda.device_count() > 1
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            config.model_dir,
            dtype=dtype,
            local_files_only=True,
            device_map="auto" if spread else None,  # any device_map needs accelerate
        )
        if not spread:
            # nn.Module.to itself: transformers' wrapper of it hides the signature from mypy.
            torch.nn.Module.to(model, device)
        if config.adapter_dir is not None:
            model = _merge_adapter(model, config.adapter_dir)
        self._model = model.train(False)
        self._tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
        self._input_device = self._model.get_input_embeddings().weight.device

        model_limit = int(self._model.config.max_position_embeddings)
        if config.max_context is not None and config.max_context > model_limit:
            raise ValueError(
                f"max_context {config.max_context} exceeds the model's {model_limit} positions"
            )
        self.context_window: int = config.max_context or model_limit

        generation_eos = self._model.generation_config.eos_token_id
        eos_ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self._stop_reasons = stop_token_reasons(
            self._tokenizer, [i for i in eos_ids if isinstance(i, int)]
        )
        pad_id = self._tokenizer.pad_token_id
        # Any id will do: padded positions are masked out of attention.
        self._pad_id: int = pad_id if isinstance(pad_id, int) else next(iter(self._stop_reasons))
        self._seed_source = torch.Generator().manual_seed(config.seed)

    def count_tokens(self, prompt: str) -> int:
        """How many tokens `prompt` takes, so a caller can check it before batching."""
        return len(self._encode(prompt))

    def open_batch(self) -> TransformersBatch:
        """A new, empty decode batch that requests join and leave between steps."""
        return TransformersBatch(self)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run a batch together; results in request order."""
        batch = self.open_batch()
        for key, request in enumerate(requests):
            batch.join(key, request, stream=False)
        results: dict[int, GenerationResult] = {}
        while len(batch):
            for output in batch.step():
                if output.result is not None:
                    results[output.key] = output.result
        return [results[key] for key in range(len(requests))]

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        """Yield a TokenDelta per generated token, then exactly one GenerationResult."""
        batch = self.open_batch()
        batch.join(0, request, stream=True)
        while len(batch):
            for output in batch.step():
                assert output.delta is not None
                yield output.delta
                if output.result is not None:
                    yield output.result

    def _encode(self, prompt: str) -> list[int]:
        # The prompt carries its own <|begin_of_text|>: add nothing.
        ids: list[int] = self._tokenizer.encode(prompt, add_special_tokens=False)
        return ids

    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError if `request` can never run."""
        self._checked_prompt_ids(request)

    def _checked_prompt_ids(self, request: GenerationRequest) -> list[int]:
        _check_sampling(request.sampling)
        if request.adapter is not None:
            # Its adapter, if any, is merged in at load: one app per adapter.
            raise InvalidRequestError("this engine serves no adapters over its model")
        prompt_ids = self._encode(request.prompt)
        check_prompt_fits(prompt_ids, self.context_window)
        return prompt_ids

    def _row(self, request: GenerationRequest) -> _Row:
        sampling = request.sampling
        prompt_ids = self._checked_prompt_ids(request)
        room = self.context_window - len(prompt_ids)
        budget = room if sampling.max_tokens <= 0 else min(sampling.max_tokens, room)
        seed = sampling.seed
        if seed is None:
            seed = int(torch.randint(2**62, (1,), generator=self._seed_source).item())
        return _Row(prompt_ids=prompt_ids, sampling=sampling, budget=budget, seed=seed)

    def _result(self, row: _Row) -> GenerationResult:
        assert row.stop_reason is not None
        text_ids = row.token_ids
        if text_ids and text_ids[-1] in self._stop_reasons:
            text_ids = text_ids[:-1]
        return GenerationResult(
            text=_text_of(self._tokenizer, text_ids),
            token_ids=tuple(row.token_ids),
            stop_reason=row.stop_reason,
            prompt_tokens=len(row.prompt_ids),
            logprobs=tuple(row.logprobs) if row.sampling.logprobs else None,
        )

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, list[float]]:
        """Pick each line's next token (greedy or sampled, per row) and its raw logprob."""
        tokens = logits.argmax(dim=-1)
        sampled = [line for line, row in enumerate(rows) if not row.sampling.greedy]
        if sampled:
            lines = torch.tensor(sampled, device=logits.device)
            sampled_rows = [rows[line] for line in sampled]
            choices = _sample(logits[lines], sampled_rows)
            tokens[lines] = choices
        if any(row.sampling.logprobs for row in rows):
            raw = torch.log_softmax(logits, dim=-1)
            chosen = raw.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
            return tokens, [float(value) for value in chosen]
        return tokens, [0.0] * len(rows)


@dataclass
class _Line:
    """A row of a running batch, with the caller's key and, for a stream, its text."""

    key: int
    row: _Row
    detokenizer: IncrementalDetokenizer | None


class TransformersBatch:
    """The engine's decode loop as a `DecodeBatch`: rows that join are prefilled
    together (left-padded), and their cache lines are merged into the running batch's,
    left-padded with masked zeros to a common length; then every row takes one token per
    step. Positions count real tokens only, so a row sees the positions it would alone.
    Rows that finish or leave drop their cache lines, and columns no remaining row
    attends to are cut. A model whose cache is not plain full-attention layers (a
    sliding window) cannot merge: rows that join then start when the batch is empty."""

    def __init__(self, engine: TransformersEngine) -> None:
        self._engine = engine
        self._lines: list[_Line] = []  # line i of the cache holds self._lines[i]
        self._joining: list[_Line] = []
        self._cache: DynamicCache | None = None
        self._attention_mask = torch.empty(0)  # [lines, cached positions]
        self._positions = torch.empty(0)  # [lines, 1]: the position of the last token
        self._next_tokens = torch.empty(0)  # [lines]: what each line feeds next

    def __len__(self) -> int:
        return len(self._lines) + len(self._joining)

    def join(self, key: int, request: GenerationRequest, *, stream: bool) -> None:
        row = self._engine._row(request)  # raises InvalidRequestError for this one alone
        detokenizer = IncrementalDetokenizer(self._engine._tokenizer) if stream else None
        self._joining.append(_Line(key, row, detokenizer))

    def leave(self, key: int) -> None:
        self._joining = [line for line in self._joining if line.key != key]
        keep = [index for index, line in enumerate(self._lines) if line.key != key]
        if len(keep) < len(self._lines):
            self._select(keep)

    @torch.inference_mode()
    def step(self) -> list[RowStep]:
        stepped: list[_Line] = []
        if self._lines:
            stepped.extend(self._decode())
        if self._joining and (self._cache is None or _mergeable(self._cache)):
            joining, self._joining = self._joining, []
            stepped.extend(self._prefill(joining))
        outputs = [self._output(line) for line in stepped]
        keep = [index for index, line in enumerate(self._lines) if not line.row.finished]
        if len(keep) < len(self._lines):
            self._select(keep)
        return outputs

    def _decode(self) -> list[_Line]:
        """One token for every running line."""
        assert self._cache is not None
        device = self._engine._input_device
        attention_mask = torch.cat(
            [self._attention_mask, self._attention_mask.new_ones((len(self._lines), 1))], dim=-1
        )
        positions = self._positions + 1
        tokens = self._forward(
            self._next_tokens.to(device).unsqueeze(-1), attention_mask, positions, self._cache
        )
        self._attention_mask, self._positions = attention_mask, positions
        self._next_tokens = self._take(tokens, self._lines)
        return list(self._lines)

    def _prefill(self, joining: list[_Line]) -> list[_Line]:
        """Prefill the joining rows together, take each one's first token, and merge
        them into the running batch."""
        device = self._engine._input_device
        pad_id = self._engine._pad_id
        width = max(len(line.row.prompt_ids) for line in joining)
        input_ids = torch.tensor(
            [
                [pad_id] * (width - len(line.row.prompt_ids)) + line.row.prompt_ids
                for line in joining
            ],
            device=device,
        )
        attention_mask = torch.tensor(
            [
                [0] * (width - len(line.row.prompt_ids)) + [1] * len(line.row.prompt_ids)
                for line in joining
            ],
            device=device,
        )
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._engine._model.config)
        tokens = self._take(self._forward(input_ids, attention_mask, positions, cache), joining)
        positions = positions[:, -1:]
        if self._cache is None:
            self._cache, self._attention_mask = cache, attention_mask
            self._positions, self._next_tokens = positions, tokens
        else:
            length = max(self._attention_mask.shape[-1], width)
            _merge_cache(self._cache, cache, length)
            self._attention_mask = torch.cat(
                [_pad_left(self._attention_mask, length), _pad_left(attention_mask, length)]
            )
            self._positions = torch.cat([self._positions, positions])
            self._next_tokens = torch.cat([self._next_tokens, tokens])
        self._lines.extend(joining)
        return joining

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        output = self._engine._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = output.logits[:, -1, :].float()
        return logits

    def _take(self, logits: torch.Tensor, lines: list[_Line]) -> torch.Tensor:
        """Choose each line's token and record it on its row, with its stop reason."""
        rows = [line.row for line in lines]
        tokens, logprobs = self._engine._choose(logits, rows)
        stop_reasons = self._engine._stop_reasons
        for row, token_id, logprob in zip(rows, tokens.tolist(), logprobs, strict=True):
            row.token_ids.append(token_id)
            row.logprobs.append(logprob)
            row.stop_reason = stop_reasons.get(token_id)
            if row.stop_reason is None and len(row.token_ids) >= row.budget:
                row.stop_reason = StopReason.OUT_OF_TOKENS
        # A CPU copy: it indexes every device, which matters when the layers (and so
        # the cache) are spread over several GPUs.
        return tokens.cpu()

    def _output(self, line: _Line) -> RowStep:
        row = line.row
        result = self._engine._result(row) if row.finished else None
        if line.detokenizer is None:
            return RowStep(key=line.key, delta=None, result=result)
        token_id = row.token_ids[-1]
        is_stop = token_id in self._engine._stop_reasons
        text = "" if is_stop else line.detokenizer.push(token_id)
        if result is not None:
            text += line.detokenizer.finish(result.text)
        logprob = row.logprobs[-1] if row.sampling.logprobs else None
        return RowStep(
            key=line.key,
            delta=TokenDelta(text=text, token_id=token_id, logprob=logprob),
            result=result,
        )

    def _select(self, keep: list[int]) -> None:
        """Keep only the lines `keep`, cache included, and cut the columns none of them
        attends to any more (the padding of rows that left)."""
        if not keep:
            self._lines, self._cache = [], None
            return
        assert self._cache is not None
        lines = torch.tensor(keep)
        self._cache.batch_select_indices(lines)
        self._lines = [self._lines[index] for index in keep]
        self._attention_mask = self._attention_mask[lines.to(self._attention_mask.device)]
        self._positions = self._positions[lines.to(self._positions.device)]
        self._next_tokens = self._next_tokens[lines]
        attended = self._attention_mask.any(dim=0)
        unused = int(attended.int().argmax()) if bool(attended.any()) else 0
        layers = _plain_layers(self._cache)
        if unused > 0 and layers is not None:
            for layer in layers:
                keys, values = _tensors(layer)
                layer.keys, layer.values = keys[..., unused:, :], values[..., unused:, :]
            self._attention_mask = self._attention_mask[:, unused:]


def _plain_layers(cache: DynamicCache) -> list[DynamicLayer] | None:
    """The layers of `cache` if every one is a plain full-attention layer holding
    tensors, which rows can be padded into and cut from; else None."""
    layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not isinstance(layer.keys, torch.Tensor):
            return None
        layers.append(layer)
    return layers


def _mergeable(cache: DynamicCache) -> bool:
    return _plain_layers(cache) is not None


def _tensors(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    assert keys is not None and values is not None  # _plain_layers checked
    return keys, values


def _pad_left(tensor: torch.Tensor, length: int, dim: int = -1) -> torch.Tensor:
    """`tensor` with zeros before its entries along `dim`, to `length` of them."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _merge_cache(running: DynamicCache, joining: DynamicCache, length: int) -> None:
    """Append `joining`'s lines to `running`'s, both left-padded to `length` positions
    (the padding is masked out of attention)."""
    into_layers, extra_layers = _plain_layers(running), _plain_layers(joining)
    assert into_layers is not None and extra_layers is not None
    for into, extra in zip(into_layers, extra_layers, strict=True):
        (keys, values), (more_keys, more_values) = _tensors(into), _tensors(extra)
        into.keys = torch.cat([_pad_left(keys, length, -2), _pad_left(more_keys, length, -2)])
        into.values = torch.cat([_pad_left(values, length, -2), _pad_left(more_values, length, -2)])


def _sample(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Sample one token per line: temperature, then top-k, then top-p (nucleus), each with
    the line's own options; a filter is off where top_k == 0 or top_p == 1."""
    device = logits.device
    temperatures = torch.tensor([row.sampling.temperature for row in rows], device=device)
    scaled = logits / temperatures.unsqueeze(-1)
    # Stable sort: among equal logits the lower id comes first, as with argmax, so
    # top_k == 1 is exactly greedy.
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)
    vocabulary = logits.shape[-1]
    ranks = torch.arange(vocabulary, device=device).unsqueeze(0)
    top_k = torch.tensor(
        [row.sampling.top_k if row.sampling.top_k > 0 else vocabulary for row in rows],
        device=device,
    )
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(-1), float("-inf"))
    probabilities = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([row.sampling.top_p for row in rows], device=device)
    # Drop a token when the ones ranked above it already hold top_p; the first always stays.
    mass_before = probabilities.cumsum(dim=-1) - probabilities
    nucleus = top_p.unsqueeze(-1)
    probabilities = probabilities.masked_fill((mass_before >= nucleus) & (nucleus < 1), 0.0)
    choices = []
    for line, row in enumerate(rows):
        if row.generator is None:
            row.generator = torch.Generator(device=device).manual_seed(row.seed)
        rank = torch.multinomial(probabilities[line], 1, generator=row.generator)
        choices.append(sorted_ids[line, rank])
    return torch.cat(choices)


def check_prompt_fits(prompt_ids: Sequence[int], context_window: int) -> None:
    """InvalidRequestError for an empty prompt or one that leaves no room to generate."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    if context_window - len(prompt_ids) < 1:
        raise InvalidRequestError(
            f"the prompt takes {len(prompt_ids)} tokens and leaves no room in the "
            f"context window of {context_window}"
        )


def _check_sampling(sampling: SamplingOptions) -> None:
    if sampling.temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0, got {sampling.top_k}")


def _merge_adapter(model: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """Apply a peft adapter and fold it into the base weights, so inference pays nothing."""
    from peft import PeftModel  # only deployments that serve adapters need peft

    with warnings.catch_warnings():
        # peft 0.21 reads a property transformers 5 deprecated; nothing for us to change.
        warnings.filterwarnings("ignore", _PEFT_DEPRECATION, FutureWarning)
        adapted = PeftModel.from_pretrained(model, adapter_dir)
    merged = adapted.merge_and_unload()
    assert isinstance(merged, PreTrainedModel)
    return merged
