"""A small Llama 3 style model built on disk, for machines that cannot download weights.

`build_demo_model` trains a byte-level BPE tokenizer with the Llama 3 special tokens and
chat template, initialises a tiny `LlamaForCausalLM` from a seed, saves both the way a
real checkpoint is laid out, and loads them back through `from_pretrained` to check them.
The same spec always gives the same bytes, so tests and the embedded default can share it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

import safetensors
import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as transformers_logging

BEGIN_OF_TEXT: Final = "<|begin_of_text|>"
END_OF_TEXT: Final = "<|end_of_text|>"
START_HEADER: Final = "<|start_header_id|>"
END_HEADER: Final = "<|end_header_id|>"
EOT: Final = "<|eot_id|>"
EOM: Final = "<|eom_id|>"
PYTHON_TAG: Final = "<|python_tag|>"
PAD: Final = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS: Final = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    START_HEADER,
    END_HEADER,
    EOT,
    EOM,
    PYTHON_TAG,
    PAD,
)

MARKER_FILE: Final = "corral_demo.json"
_MARKER_FORMAT: Final = 1
_MODEL_FILES: Final = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
_BYTE_ALPHABET_SIZE: Final = 256
# Seeding is process-global: two threads initialising weights at once would interleave draws.
_SEEDED_INIT_LOCK: Final = threading.Lock()

# Llama 3's own pre-tokenizer split (from Meta's tokenizer.json), then bytes to unicode.
_LLAMA3_SPLIT_PATTERN: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Llama 3 / 3.1 prompt format. Contents are trimmed as Meta's template does; the
# assistant's content and its <|eot_id|> sit inside {% generation %} so that
# `return_assistant_tokens_mask` (and trl's assistant_only_loss) train on exactly them.
# A spec role "tool" is rendered with the header "ipython", as Llama 3.1 does.
LLAMA3_CHAT_TEMPLATE: Final = "".join(
    (
        "{%- macro text(content) -%}",
        "{%- if content is string -%}{{- content | trim -}}",
        "{%- else -%}{%- set ns = namespace(parts='') -%}",
        "{%- for part in content if part['type'] == 'text' -%}",
        "{%- set ns.parts = ns.parts + part['text'] -%}",
        "{%- endfor -%}{{- ns.parts | trim -}}",
        "{%- endif -%}",
        "{%- endmacro -%}",
        "{{- '<|begin_of_text|>' -}}",
        "{%- for message in messages -%}",
        "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}",
        "{%- if role not in ['system', 'user', 'assistant', 'ipython'] -%}",
        "{{- raise_exception('Unsupported role: ' ~ message['role']) -}}",
        "{%- endif -%}",
        "{{- '<|start_header_id|>' ~ role ~ '<|end_header_id|>\\n\\n' -}}",
        "{%- if role == 'assistant' -%}",
        "{%- generation -%}",
        "{{- text(message.get('content', '')) ~ '<|eot_id|>' -}}",
        "{%- endgeneration -%}",
        "{%- else -%}",
        "{{- text(message.get('content', '')) ~ '<|eot_id|>' -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}",
        "{%- endif -%}",
    )
)


@dataclass(frozen=True)
class DemoModelSpec:
    """The architecture and seed of a demo model; equal specs build identical models."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        minimum_vocab = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
        if self.vocab_size < minimum_vocab:
            raise ValueError(f"vocab_size must be at least {minimum_vocab}, got {self.vocab_size}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a positive multiple of num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.max_position_embeddings < 16:
            raise ValueError("max_position_embeddings must be at least 16")


def build_demo_model(
    directory: Path, *, spec: DemoModelSpec = DemoModelSpec(), corpus: Iterable[str] | None = None
) -> Path:
    """Build (or keep) a demo model in `directory` and return it.

    A directory that already holds a complete demo model of the same spec and corpus is
    left alone; one holding a demo model of another spec is rebuilt; a non-empty
    directory without our marker is refused with ValueError. The model is built and
    checked in a staging directory beside `directory` and moved into place only once it
    loads back, so a failed or interrupted build never leaves a half model behind.
    """
    directory = Path(directory)
    texts = [*_builtin_corpus(), *(corpus or ())]
    marker = {
        "format": _MARKER_FORMAT,
        "spec": asdict(spec),
        "corpus_sha256": _corpus_digest(texts),
    }
    if _existing_state(directory, marker) == "current":
        return directory

    directory.parent.mkdir(parents=True, exist_ok=True)
    with (
        _quiet_progress_bars(),
        tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.") as tmp,
    ):
        staging = Path(tmp) / "model"
        _save_model(staging, spec, texts)
        _verify(staging, spec)
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install(staging, directory, marker)
    return directory


def load_demo_model(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model directory through `from_pretrained`, from local files only."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no model (config.json) in {directory}")
    # from_pretrained returns the model in eval mode.
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def describe(directory: Path) -> str:
    """One line about a model directory: parameters, vocabulary and layers, without loading it."""
    directory = Path(directory)
    config_file = directory / "config.json"
    weight_files = sorted(directory.glob("*.safetensors"))
    if not config_file.is_file() or not weight_files:
        raise ValueError(f"{directory} holds no safetensors model")
    config = json.loads(config_file.read_text())
    parameters = 0
    for weight_file in weight_files:
        with safetensors.safe_open(str(weight_file), framework="pt") as weights:
            names: list[str] = weights.keys()  # safe_open is not iterable itself
            for name in names:
                parameters += _numel(weights.get_slice(name).get_shape())
    kind = "demo " if (directory / MARKER_FILE).is_file() else ""
    return (
        f"{kind}{config.get('model_type', 'unknown')} model at {directory}: "
        f"{_human_count(parameters)} parameters, vocab {config.get('vocab_size')}, "
        f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}"
    )


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """transformers 5 draws tqdm bars for saving and loading weights; a build is not news."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _existing_state(
    directory: Path, marker: dict[str, Any], files: tuple[str, ...] = _MODEL_FILES
) -> Literal["absent", "current", "stale"]:
    """What `directory` holds: nothing, this very demo model (its marker and all of
    `files`), or another (or incomplete) one.

    Anything else is not ours to overwrite: ValueError.
    """
    if not directory.exists():
        return "absent"
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    marker_file = directory / MARKER_FILE
    if not marker_file.is_file():
        if any(directory.iterdir()):
            raise ValueError(
                f"{directory} is not empty and does not hold a demo model; refusing it"
            )
        return "absent"
    try:
        found = json.loads(marker_file.read_text())
    except (OSError, ValueError):
        return "stale"
    complete = all((directory / name).is_file() for name in files)
    return "current" if complete and found == marker else "stale"


def _install(
    staging: Path, directory: Path, marker: dict[str, Any], files: tuple[str, ...] = _MODEL_FILES
) -> None:
    """Move the checked model into place; tolerate a concurrent builder that won the race."""
    state = _existing_state(directory, marker, files)  # again: another builder may have finished
    if state == "current":
        return
    if state == "stale":
        shutil.rmtree(directory)  # our own marker says this is a demo model
    elif directory.exists():
        directory.rmdir()  # empty, or _existing_state would have refused it
    try:
        staging.rename(directory)
    except OSError:
        if _existing_state(directory, marker, files) != "current":
            raise


def _save_model(directory: Path, spec: DemoModelSpec, texts: list[str]) -> None:
    tokenizer = _train_tokenizer(spec, texts)
    ids = tokenizer.get_vocab()
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=ids[BEGIN_OF_TEXT],
        # As Llama 3.1 Instruct: stop at the end of text, a tool call, or a turn.
        eos_token_id=[ids[END_OF_TEXT], ids[EOM], ids[EOT]],
        pad_token_id=ids[PAD],
    )
    # fork_rng: the seed decides the weights without disturbing the caller's RNG.
    with _SEEDED_INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_dict(
        {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
    )
    directory.mkdir(parents=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _train_tokenizer(spec: DemoModelSpec, texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE laid out like Llama 3's: learned tokens first, then special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # Llama 3 reserves unused special ids; do the same when the corpus runs out of merges,
    # so the vocabulary always has exactly spec.vocab_size entries.
    shortfall = spec.vocab_size - len(SPECIAL_TOKENS) - backend.get_vocab_size()
    reserved = [f"<|reserved_special_token_{index}|>" for index in range(shortfall)]
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in (*SPECIAL_TOKENS, *reserved)
        ]
    )
    bos_id = backend.token_to_id(BEGIN_OF_TEXT)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT} $A",
                pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT}:1 $B:1",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )
    # PreTrainedTokenizerFast is transformers 5's TokenizersBackend; its __init__ is unannotated.
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


_CHECK_CONVERSATION: Final = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
)


def _verify(directory: Path, spec: DemoModelSpec) -> None:
    """Load the saved model the real way and raise RuntimeError if anything is off."""
    model, tokenizer = load_demo_model(directory)
    if len(tokenizer) != spec.vocab_size or model.config.vocab_size != spec.vocab_size:
        raise RuntimeError(
            f"vocabulary mismatch: tokenizer {len(tokenizer)}, model {model.config.vocab_size}, "
            f"spec {spec.vocab_size}"
        )
    for token in SPECIAL_TOKENS:
        if tokenizer.encode(token, add_special_tokens=False) != [
            tokenizer.convert_tokens_to_ids(token)
        ]:
            raise RuntimeError(f"special token {token} does not encode as one id")

    conversation = [dict(message) for message in _CHECK_CONVERSATION]
    expected = BEGIN_OF_TEXT + "".join(
        f"{START_HEADER}{message['role']}{END_HEADER}\n\n{message['content']}{EOT}"
        for message in conversation
    )
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    if rendered != expected:
        raise RuntimeError(f"chat template renders {rendered!r}, expected {expected!r}")
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    if not isinstance(encoded, BatchEncoding):
        raise RuntimeError(f"apply_chat_template returned {type(encoded).__name__}")
    input_ids: list[int] = encoded["input_ids"]
    if tokenizer.decode(input_ids, skip_special_tokens=False) != expected:
        raise RuntimeError("chat template does not survive an encode/decode round trip")
    assistant_ids = [
        i for i, keep in zip(input_ids, encoded["assistant_masks"], strict=True) if keep
    ]
    if tokenizer.decode(assistant_ids) != conversation[-1]["content"] + EOT:
        raise RuntimeError("the assistant token mask does not cover exactly the assistant reply")

    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits
    if logits.shape != (1, len(input_ids), spec.vocab_size) or not torch.isfinite(logits).all():
        raise RuntimeError(f"unexpected forward pass output of shape {tuple(logits.shape)}")


def _corpus_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _human_count(count: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


# A small, varied English corpus generated from word lists: plain sentences, questions
# and answers, chat-style turns, numbers and a little code, so common words and the
# role names become single tokens.
_SUBJECTS: Final = (
    "the cat",
    "a young farmer",
    "my neighbour",
    "the old robot",
    "our teacher",
    "a curious child",
    "the river guide",
    "this small model",
    "the night nurse",
    "a tired engineer",
    "the baker",
    "every student",
    "the captain",
    "her brother",
    "the new intern",
    "a quiet librarian",
)
_VERBS: Final = (
    "reads",
    "builds",
    "finds",
    "paints",
    "carries",
    "explains",
    "remembers",
    "cleans",
    "answers",
    "writes",
    "opens",
    "follows",
    "repairs",
    "counts",
    "shares",
    "plans",
)
_OBJECTS: Final = (
    "a short letter",
    "the heavy box",
    "an old map",
    "the garden gate",
    "a long story",
    "the broken clock",
    "three green apples",
    "the weather report",
    "a simple question",
    "the kitchen table",
    "a list of numbers",
    "the first chapter",
    "a paper boat",
    "the morning train",
    "some fresh bread",
    "the last answer",
)
_PLACES: Final = (
    "in the morning",
    "after lunch",
    "near the station",
    "before the storm",
    "at the market",
    "on a sunny day",
    "in the library",
    "by the window",
    "at midnight",
    "during the meeting",
    "under the bridge",
    "at home",
    "in the city",
    "on the hill",
    "across the street",
    "with great care",
)
_QUESTIONS: Final = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky?", "On a clear day the sky is blue."),
    ("Can you help me write a poem?", "Of course. What would you like the poem to be about?"),
    ("What is two plus three?", "Two plus three is five."),
    ("Who wrote this letter?", "I am not sure, but the name at the bottom may tell us."),
    ("Where should I start?", "Start with the first step and check each result."),
    ("Why is the grass green?", "Grass is green because of the chlorophyll in its leaves."),
    ("What time is it in Tokyo?", "I cannot see a clock, but I can help you work it out."),
    ("Please summarize the story.", "A child finds a map, follows it, and comes home wiser."),
    ("Translate hello into Spanish.", "Hello in Spanish is hola."),
    ("Is it going to rain today?", "I do not have live weather data; please check a forecast."),
    ("How do I sort a list in Python?", "Use sorted(items) for a new list or items.sort()."),
    ("What does a model learn?", "A model learns patterns from the examples it is trained on."),
    ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
    ("Thank you for your help!", "You are welcome. Is there anything else I can do?"),
)
_SNIPPETS: Final = (
    "You are a helpful assistant.",
    "You are a careful assistant who answers briefly and honestly.",
    "The system asks the user a question and the assistant answers.",
    "The tool returned a result, and the assistant read it.",
    "ipython: the code ran and printed the answer.",
    'print("hello, world")',
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    total += i",
    'result = search(query="weather in Paris")',
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "Cutting Knowledge Date: December 2023",
    "Today Date: 26 Jul 2024",
    "The numbers are 1, 2, 3, 10, 42, 100, 2024 and 3.14.",
    "Don't worry; it's fine. We'll see what they've done, and I'm sure you'd agree.",
    "Hello! How are you today? I'm well, thanks for asking.",
    "Yes. No. Maybe. Sure! Okay? Great: let's begin.",
)


def _builtin_corpus() -> Iterator[str]:
    count = len(_SUBJECTS)
    for index, (subject, verb) in enumerate(itertools.product(_SUBJECTS, _VERBS)):
        sentence = f"{subject} {verb} {_OBJECTS[index % count]} {_PLACES[(index * 7) % count]}."
        yield sentence[0].upper() + sentence[1:]
    for question, answer in _QUESTIONS:
        yield question
        yield answer
        yield f"user: {question}\nassistant: {answer}"
    yield from _SNIPPETS
