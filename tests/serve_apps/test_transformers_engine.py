"""The transformers engine on a real (tiny, random) Llama model built on disk: batching,
sampling, stop tokens, streaming text, logprobs and LoRA adapters, without mocks."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from corral.demo_model import END_OF_TEXT, EOM, EOT
from serve_apps.engines.protocol import (
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    StopReason,
    TokenDelta,
)
from serve_apps.engines.transformers_engine import (
    IncrementalDetokenizer,
    InvalidRequestError,
    TransformersEngine,
    TransformersEngineConfig,
    stop_token_reasons,
)
from tests.conftest import PEFT_DEPRECATION, make_lora_adapter

# The model is random, so it never stops on its own within a few tokens: every request
# runs to max_tokens unless a test arranges a stop token.
PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
SHORT = PROMPT.format("Hi")
MEDIUM = PROMPT.format("What is the capital of France?")
LONG = PROMPT.format(
    "Tell me a fun fact about the old robot who reads a long story in the library, "
    "and then explain it to a curious child."
)
GREEDY = SamplingOptions(max_tokens=12)
SAMPLED = SamplingOptions(max_tokens=12, strategy="top_p", temperature=1.0, top_p=0.9, seed=7)


def ask(prompt: str, sampling: SamplingOptions = GREEDY) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=sampling)


def with_options(**changes: object) -> SamplingOptions:
    values = {**SAMPLED.__dict__, **changes}
    return SamplingOptions(**values)


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> TransformersEngine:
    return TransformersEngine(TransformersEngineConfig(model_dir=demo_model_dir, device="cpu"))


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)


def test_engine_satisfies_the_protocol(engine: TransformersEngine) -> None:
    assert isinstance(engine, GenerationEngine)


def test_greedy_is_deterministic_and_respects_max_tokens(engine: TransformersEngine) -> None:
    first, second = engine.generate([ask(MEDIUM)]), engine.generate([ask(MEDIUM)])
    assert first == second
    (result,) = first
    assert len(result.token_ids) == GREEDY.max_tokens
    assert result.stop_reason is StopReason.OUT_OF_TOKENS
    assert result.prompt_tokens == engine.count_tokens(MEDIUM)
    assert result.logprobs is None


def test_a_batch_equals_each_request_alone(engine: TransformersEngine) -> None:
    """Prompts of different lengths are left-padded together; padding must not leak."""
    requests = [ask(LONG), ask(SHORT), ask(MEDIUM, with_options(seed=11)), ask(SHORT)]
    lengths = {engine.count_tokens(request.prompt) for request in requests}
    assert len(lengths) == 3
    batched = engine.generate(requests)
    alone = [engine.generate([request])[0] for request in requests]
    assert batched == alone


def test_rows_that_finish_early_leave_the_batch_without_disturbing_the_rest(
    engine: TransformersEngine,
) -> None:
    short = ask(MEDIUM, SamplingOptions(max_tokens=2))
    long = ask(LONG, SamplingOptions(max_tokens=15))
    batched = engine.generate([short, long, short])
    assert [len(result.token_ids) for result in batched] == [2, 15, 2]
    assert batched[1] == engine.generate([long])[0]
    assert batched[0] == batched[2] == engine.generate([short])[0]


def test_rows_that_join_a_running_batch_equal_each_request_alone(
    engine: TransformersEngine,
) -> None:
    """Continuous batching: rows join between steps (their cache lines merged in,
    padded), one leaves early, and each result is what the request gives alone; a
    streamed row's deltas add up to its result."""
    requests = {
        0: ask(MEDIUM, SamplingOptions(max_tokens=6)),
        1: ask(LONG, SamplingOptions(max_tokens=9)),  # joins longer than the running cache
        2: ask(SHORT, with_options(max_tokens=8, seed=5)),
        3: ask(SHORT, SamplingOptions(max_tokens=20)),  # leaves after a few tokens
    }
    batch = engine.open_batch()
    batch.join(0, requests[0], stream=False)
    results: dict[int, GenerationResult] = {}
    deltas: list[str] = []
    steps = 0
    while len(batch):
        if steps == 2:
            batch.join(1, requests[1], stream=True)
            batch.join(3, requests[3], stream=False)
        if steps == 4:
            batch.join(2, requests[2], stream=False)
        if steps == 6:
            batch.leave(3)
        for output in batch.step():
            if output.key == 1:
                assert output.delta is not None
                deltas.append(output.delta.text)
            else:
                assert output.delta is None
            if output.result is not None:
                results[output.key] = output.result
        steps += 1
    assert sorted(results) == [0, 1, 2]
    for key in results:
        assert results[key] == engine.generate([requests[key]])[0], key
    assert "".join(deltas) == results[1].text


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine: TransformersEngine) -> None:
    once = engine.generate([ask(MEDIUM, with_options(max_tokens=24))])[0]
    again = engine.generate([ask(MEDIUM, with_options(max_tokens=24))])[0]
    other = engine.generate([ask(MEDIUM, with_options(max_tokens=24, seed=8))])[0]
    greedy = engine.generate([ask(MEDIUM, SamplingOptions(max_tokens=24))])[0]
    assert once.token_ids == again.token_ids
    assert once.token_ids != other.token_ids
    assert once.token_ids != greedy.token_ids


def test_unseeded_requests_draw_fresh_seeds(engine: TransformersEngine) -> None:
    unseeded = with_options(seed=None, max_tokens=24)
    first, second = engine.generate([ask(MEDIUM, unseeded), ask(MEDIUM, unseeded)])
    assert first.token_ids != second.token_ids


def test_top_k_one_and_zero_temperature_are_greedy(engine: TransformersEngine) -> None:
    greedy = engine.generate([ask(LONG)])[0]
    top_k_one = with_options(strategy="top_k", temperature=1.5, top_k=1, top_p=1.0)
    cold = with_options(temperature=0.0)
    assert engine.generate([ask(LONG, top_k_one)])[0].token_ids == greedy.token_ids
    assert engine.generate([ask(LONG, cold)])[0].token_ids == greedy.token_ids


def test_logprobs_are_the_raw_model_log_probabilities(
    engine: TransformersEngine, demo_model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    greedy, sampled = engine.generate(
        [
            ask(MEDIUM, SamplingOptions(max_tokens=6, logprobs=True)),
            ask(MEDIUM, with_options(max_tokens=6, logprobs=True, temperature=0.7)),
        ]
    )
    for result in (greedy, sampled):
        assert result.logprobs is not None
        assert len(result.logprobs) == len(result.token_ids)
        assert all(math.isfinite(value) and value <= 0 for value in result.logprobs)

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, local_files_only=True)
    prompt_ids = tokenizer.encode(MEDIUM, add_special_tokens=False)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + list(greedy.token_ids)])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for step, (token_id, logprob) in enumerate(
        zip(greedy.token_ids, greedy.logprobs or (), strict=True)
    ):
        position = len(prompt_ids) - 1 + step
        assert int(expected[position].argmax()) == token_id
        assert logprob == pytest.approx(float(expected[position, token_id]), abs=1e-4)


def test_stream_yields_a_delta_per_token_then_one_result(engine: TransformersEngine) -> None:
    request = ask(LONG, SamplingOptions(max_tokens=20, logprobs=True))
    events = list(engine.stream(request))
    deltas = [event for event in events if isinstance(event, TokenDelta)]
    results = [event for event in events if isinstance(event, GenerationResult)]
    assert len(results) == 1
    assert events[-1] is results[0]
    result = results[0]
    assert "".join(delta.text for delta in deltas) == result.text
    assert tuple(delta.token_id for delta in deltas) == result.token_ids
    assert tuple(delta.logprob for delta in deltas) == result.logprobs
    assert result == engine.generate([request])[0]


def test_stream_without_logprobs_reports_none(engine: TransformersEngine) -> None:
    events = list(engine.stream(ask(SHORT, SamplingOptions(max_tokens=3))))
    assert [type(event) for event in events] == [TokenDelta] * 3 + [GenerationResult]
    assert all(event.logprob is None for event in events if isinstance(event, TokenDelta))


def test_incremental_detokenizer_never_emits_broken_characters(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    text = "naïve café: 世界 🎉 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in ids]
    assert "" in deltas  # some tokens only complete part of a character
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) + detokenizer.finish(text) == text


def test_incremental_detokenizer_flushes_a_cut_short_character(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    first_byte = tokenizer.encode("🎉", add_special_tokens=False)[:1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(first_byte[0]) == ""
    assert detokenizer.finish(str(tokenizer.decode(first_byte))) == "\ufffd"


def test_max_tokens_zero_runs_to_the_context_window(demo_model_dir: Path) -> None:
    probe = TransformersEngine(TransformersEngineConfig(model_dir=demo_model_dir, device="cpu"))
    prompt_tokens = probe.count_tokens(MEDIUM)
    small = TransformersEngine(
        TransformersEngineConfig(
            model_dir=demo_model_dir, device="cpu", max_context=prompt_tokens + 5
        )
    )
    for max_tokens in (0, -1, 50):
        (result,) = small.generate([ask(MEDIUM, SamplingOptions(max_tokens=max_tokens))])
        assert len(result.token_ids) == 5
        assert result.stop_reason is StopReason.OUT_OF_TOKENS
    with pytest.raises(InvalidRequestError, match="no room"):
        small.generate([ask(LONG)])


def test_bad_requests_are_refused_before_any_work(engine: TransformersEngine) -> None:
    for bad in (
        ask(""),
        ask(SHORT, with_options(temperature=-1.0)),
        ask(SHORT, with_options(top_p=0.0)),
        ask(SHORT, with_options(top_k=-2)),
    ):
        with pytest.raises(InvalidRequestError):
            engine.generate([ask(MEDIUM), bad])
    with pytest.raises(ValueError, match="exceeds"):
        TransformersEngine(
            TransformersEngineConfig(model_dir=engine.config.model_dir, max_context=10**6)
        )
    with pytest.raises(ValueError, match="device"):
        TransformersEngineConfig(model_dir=engine.config.model_dir, device="tpu")


def test_stop_token_mapping(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.get_vocab()
    reasons = stop_token_reasons(tokenizer)
    assert reasons == {
        ids[EOT]: StopReason.END_OF_TURN,
        ids[EOM]: StopReason.END_OF_MESSAGE,
        ids[END_OF_TEXT]: StopReason.END_OF_TURN,
    }
    assert stop_token_reasons(tokenizer, [7])[7] is StopReason.END_OF_TURN


def _model_that_stops(source: Path, destination: Path, prompt: str, stop_token: str) -> int:
    """Copy the model with the stop token's output row swapped with that of the greedy
    path's first new token from step 2 on, so greedy decoding emits the stop token there
    (earlier steps keep their argmax). Returns how many tokens come before the stop."""
    engine = TransformersEngine(TransformersEngineConfig(model_dir=source, device="cpu"))
    path = engine.generate([ask(prompt, SamplingOptions(max_tokens=8))])[0].token_ids
    step = next(i for i in range(2, len(path)) if path[i] not in path[:i])
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    stop_id = tokenizer.convert_tokens_to_ids(stop_token)
    assert stop_id not in path
    with torch.no_grad():
        rows = model.lm_head.weight
        rows[[stop_id, path[step]]] = rows[[path[step], stop_id]]
    model.save_pretrained(destination)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, destination / name)
    return step


@pytest.mark.parametrize(
    ("stop_token", "reason"),
    [(EOT, StopReason.END_OF_TURN), (EOM, StopReason.END_OF_MESSAGE)],
)
def test_a_stop_token_ends_generation_with_its_reason(
    demo_model_dir: Path, tmp_path: Path, stop_token: str, reason: StopReason
) -> None:
    step = _model_that_stops(demo_model_dir, tmp_path, MEDIUM, stop_token)
    engine = TransformersEngine(TransformersEngineConfig(model_dir=tmp_path, device="cpu"))
    request = ask(MEDIUM, SamplingOptions(max_tokens=50))
    batched, other = engine.generate([request, ask(LONG, SamplingOptions(max_tokens=4))])
    assert batched.stop_reason is reason
    assert len(batched.token_ids) == step + 1
    assert engine.count_tokens(batched.text) == step  # the stop token is not in the text
    assert stop_token not in batched.text
    assert other.stop_reason is StopReason.OUT_OF_TOKENS
    *deltas, result = engine.stream(request)
    assert result == batched
    assert isinstance(deltas[-1], TokenDelta)
    assert deltas[-1].text == ""


@pytest.fixture(scope="module")
def adapter_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on q_proj/v_proj with random (not zero) B matrices, so it matters."""
    return make_lora_adapter(demo_model_dir, tmp_path_factory.mktemp("adapter"))


def test_a_lora_adapter_changes_the_output(
    engine: TransformersEngine, demo_model_dir: Path, adapter_dir: Path
) -> None:
    adapted = TransformersEngine(
        TransformersEngineConfig(model_dir=demo_model_dir, adapter_dir=adapter_dir, device="cpu")
    )
    request = ask(MEDIUM, SamplingOptions(max_tokens=8))
    merged = adapted.generate([request])[0]
    assert merged.token_ids != engine.generate([request])[0].token_ids

    # The merged weights decode as the unmerged adapter does.
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, local_files_only=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", PEFT_DEPRECATION, FutureWarning)
        unmerged = PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    ids = torch.tensor([tokenizer.encode(MEDIUM, add_special_tokens=False)])
    with torch.inference_mode():
        for _ in range(len(merged.token_ids)):
            next_id = unmerged(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=-1)
    assert tuple(ids[0, -len(merged.token_ids) :].tolist()) == merged.token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda(demo_model_dir: Path) -> None:
    engine = TransformersEngine(TransformersEngineConfig(model_dir=demo_model_dir))
    parameter = next(engine._model.parameters())
    assert parameter.device.type == "cuda"
    assert parameter.dtype is torch.bfloat16
    requests = [ask(LONG), ask(SHORT, SAMPLED)]
    batched = engine.generate(requests)
    assert [len(result.token_ids) for result in batched] == [GREEDY.max_tokens] * 2
    assert (
        engine.generate([requests[1]])[0].token_ids == engine.generate([requests[1]])[0].token_ids
    )
    *deltas, result = engine.stream(requests[0])
    assert isinstance(result, GenerationResult)
    assert "".join(delta.text for delta in deltas if isinstance(delta, TokenDelta)) == result.text
