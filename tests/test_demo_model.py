"""The demo model: a Llama 3 style tokenizer and model built on disk, loaded back for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from corral.demo_model import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    EOM,
    EOT,
    LLAMA3_CHAT_TEMPLATE,
    MARKER_FILE,
    PAD,
    SPECIAL_TOKENS,
    DemoModelSpec,
    build_demo_model,
    describe,
    load_demo_model,
)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
RENDERED = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
)
GENERATION_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_demo_model(demo_model_dir)


@pytest.fixture(scope="module")
def model(loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> PreTrainedModel:
    return loaded[0]


@pytest.fixture(scope="module")
def tokenizer(
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> PreTrainedTokenizerBase:
    return loaded[1]


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {
        name: (directory / name).read_bytes() for name in ("model.safetensors", "tokenizer.json")
    }


def _mtimes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


# --- what is on disk and what loads back ---------------------------------------------------


def test_directory_has_the_layout_of_a_real_checkpoint(demo_model_dir: Path) -> None:
    names = {path.name for path in demo_model_dir.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        MARKER_FILE,
    }
    assert (demo_model_dir / "chat_template.jinja").read_text() == LLAMA3_CHAT_TEMPLATE
    marker = json.loads((demo_model_dir / MARKER_FILE).read_text())
    assert marker["spec"] == {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
        "seed": 0,
    }
    assert not list(demo_model_dir.parent.glob(".model.*")), "staging directory left behind"


def test_loads_back_as_a_llama_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    spec = DemoModelSpec()
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.config.vocab_size == len(tokenizer) == spec.vocab_size
    assert model.config.num_hidden_layers == spec.num_hidden_layers
    assert model.config.num_key_value_heads == spec.num_key_value_heads
    assert model.get_input_embeddings().weight.shape == (spec.vocab_size, spec.hidden_size)
    assert tokenizer.is_fast
    assert tokenizer.model_max_length == spec.max_position_embeddings


def test_special_token_ids_in_config_and_generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = tokenizer.get_vocab()
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        BEGIN_OF_TEXT,
        EOT,
        PAD,
    )
    stop_ids = [ids[END_OF_TEXT], ids[EOM], ids[EOT]]
    for config in (model.config, model.generation_config):
        assert config.bos_token_id == ids[BEGIN_OF_TEXT]
        assert config.eos_token_id == stop_ids
        assert config.pad_token_id == ids[PAD]


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_tokens_encode_as_single_ids(
    tokenizer: PreTrainedTokenizerBase, token: str
) -> None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    assert ids == [tokenizer.convert_tokens_to_ids(token)]
    assert ids[0] >= DemoModelSpec().vocab_size - len(SPECIAL_TOKENS)
    assert tokenizer.decode(ids) == token


def test_text_round_trips_and_gets_a_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Hello, wörld! It's 2024 🎉\n\tdef f(x): return x * 3.14"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == BEGIN_OF_TEXT + text


# --- the chat template ---------------------------------------------------------------------


def test_chat_template_renders_llama3_format(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED


def test_chat_template_adds_generation_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    rendered = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )
    assert rendered == RENDERED.rsplit(GENERATION_PROMPT, 1)[0] + GENERATION_PROMPT


def test_chat_template_maps_tool_to_ipython_and_trims(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "  Weather "},
                {"type": "text", "text": "in Paris?"},
            ],
        },
        {"role": "tool", "content": '{"temperature": 21}\n'},
        {"role": "ipython", "content": "ok"},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 21}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\nok<|eot_id|>"
    )


def test_chat_template_rejects_unknown_roles(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(TemplateError, match="Unsupported role: narrator"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_tokenized_chat_round_trips(tokenizer: PreTrainedTokenizerBase) -> None:
    encoded = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)
    assert tokenizer.decode(encoded["input_ids"]) == RENDERED
    header_ids = tokenizer.encode("<|start_header_id|>", add_special_tokens=False)
    assert encoded["input_ids"].count(header_ids[0]) == len(CONVERSATION)


def test_assistant_tokens_mask_marks_exactly_the_assistant_replies(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    conversation = [
        *CONVERSATION,
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."},
    ]
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    # Expected mask, built independently: every piece starts at a token boundary (after a
    # special token or "\n\n"), so encoding the pieces separately gives the same ids.
    expected_ids: list[int] = tokenizer.encode(BEGIN_OF_TEXT, add_special_tokens=False)
    expected_mask = [0] * len(expected_ids)
    for message in conversation:
        header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        for piece, is_assistant in (
            (header, False),
            (message["content"] + EOT, message["role"] == "assistant"),
        ):
            piece_ids = tokenizer.encode(piece, add_special_tokens=False)
            expected_ids += piece_ids
            expected_mask += [int(is_assistant)] * len(piece_ids)
    assert encoded["input_ids"] == expected_ids
    assert encoded["assistant_masks"] == expected_mask
    masked = [
        i for i, keep in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if keep
    ]
    assert (
        tokenizer.decode(masked)
        == "The capital of France is Paris.<|eot_id|>Rome, since 1871.<|eot_id|>"
    )


# --- the model ----------------------------------------------------------------------------


def test_greedy_generate_is_repeatable(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    inputs = tokenizer.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, second)
    assert prompt_length < first.shape[1] <= prompt_length + 4
    assert torch.equal(first[:, :prompt_length], inputs["input_ids"])
    assert isinstance(tokenizer.decode(first[0, prompt_length:]), str)


def test_describe_summarises_without_loading(demo_model_dir: Path, model: PreTrainedModel) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    line = describe(demo_model_dir)
    assert "\n" not in line
    assert line.startswith(f"demo llama model at {demo_model_dir}: ")
    assert f"{parameters / 1000:.2f}K parameters" in line
    assert "vocab 512" in line
    assert "2 layers" in line


def test_describe_refuses_a_directory_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no safetensors model"):
        describe(tmp_path)


# --- building: determinism, idempotency, refusal -------------------------------------------


def test_build_is_deterministic(tmp_path: Path, demo_model_dir: Path) -> None:
    again = build_demo_model(tmp_path / "again")
    assert _file_bytes(again) == _file_bytes(demo_model_dir)


@pytest.mark.slow
def test_build_is_deterministic_across_processes(tmp_path: Path, demo_model_dir: Path) -> None:
    directory = tmp_path / "elsewhere"
    script = "import sys; from pathlib import Path; from corral.demo_model import build_demo_model;"
    script += " build_demo_model(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(directory)], check=True, env=env)
    assert _file_bytes(directory) == _file_bytes(demo_model_dir)


def test_concurrent_builds_of_one_directory_agree(tmp_path: Path, demo_model_dir: Path) -> None:
    directory = tmp_path / "model"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(build_demo_model, [directory, directory]))
    assert results == [directory, directory]
    assert _file_bytes(directory) == _file_bytes(demo_model_dir)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_seed_and_corpus_change_what_is_built(tmp_path: Path, demo_model_dir: Path) -> None:
    reference = _file_bytes(demo_model_dir)
    other_seed = _file_bytes(build_demo_model(tmp_path / "seed", spec=DemoModelSpec(seed=1)))
    assert other_seed["model.safetensors"] != reference["model.safetensors"]
    assert other_seed["tokenizer.json"] == reference["tokenizer.json"]

    corpus = ["The zyzzyva hums by the quarry."] * 200
    directory = build_demo_model(tmp_path / "corpus", corpus=corpus)
    assert _file_bytes(directory)["tokenizer.json"] != reference["tokenizer.json"]
    _, tokenizer = load_demo_model(directory)
    assert len(tokenizer.tokenize(" zyzzyva")) == 1


def test_build_does_not_disturb_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_demo_model(tmp_path / "model", spec=DemoModelSpec(seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_rebuilding_the_same_spec_leaves_the_directory_alone(demo_model_dir: Path) -> None:
    before = _mtimes(demo_model_dir)
    assert build_demo_model(demo_model_dir) == demo_model_dir
    assert _mtimes(demo_model_dir) == before


def test_a_demo_model_of_another_spec_is_rebuilt(tmp_path: Path) -> None:
    directory = build_demo_model(tmp_path / "model")
    build_demo_model(directory, spec=DemoModelSpec(num_hidden_layers=1, vocab_size=300))
    marker = json.loads((directory / MARKER_FILE).read_text())
    assert marker["spec"]["num_hidden_layers"] == 1
    model, tokenizer = load_demo_model(directory)
    assert model.config.num_hidden_layers == 1
    assert len(tokenizer) == model.config.vocab_size == 300


def test_an_incomplete_demo_model_is_rebuilt(tmp_path: Path, demo_model_dir: Path) -> None:
    directory = build_demo_model(tmp_path / "model")
    (directory / "model.safetensors").unlink()
    build_demo_model(directory)
    assert _file_bytes(directory) == _file_bytes(demo_model_dir)


def test_an_empty_directory_is_used(tmp_path: Path) -> None:
    directory = tmp_path / "empty"
    directory.mkdir()
    assert build_demo_model(directory) == directory
    assert (directory / MARKER_FILE).is_file()


def test_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_demo_model(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match="not a directory"):
        build_demo_model(path)


@pytest.mark.parametrize(
    "changes",
    [
        {"vocab_size": 100},
        {"hidden_size": 60},
        {"num_key_value_heads": 3},
        {"hidden_size": 24, "num_attention_heads": 8},
        {"num_hidden_layers": 0},
    ],
)
def test_spec_rejects_impossible_architectures(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        DemoModelSpec(**changes)


def test_load_demo_model_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_demo_model(tmp_path)
