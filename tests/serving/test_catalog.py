"""The models file, the embedded default, and Serve app names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.api.models import ModelInfo, RegisterModelRequest
from corral.config import Settings
from corral.serving.catalog import (
    SPEC_MODEL_NAMES,
    ModelsFileError,
    ModelSpec,
    embedded_default,
    file_app_name,
    load_catalog,
    load_models_file,
    tenant_app_name,
)
from serve_apps.llm import LLMAppConfig
from serve_apps.options import ReplicaOptions
from serve_apps.reward import RewardAppConfig


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_a_models_file_is_read_with_directories_relative_to_it(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
models:
  - name: llama3_8b_chat
    aliases: [chat]
    checkpoint_dir: weights/llama-3.1-8b-instruct
    gpus_per_replica: 1
    min_replicas: 1
    max_replicas: 4
    target_ongoing_requests: 4
    max_batch_size: 16
  - name: my-sft
    checkpoint_dir: /srv/base
    adapter_dir: adapters/sft
""",
    )
    chat, sft = load_models_file(path)
    assert chat.names == ("llama3_8b_chat", "chat")
    assert chat.checkpoint_dir == tmp_path / "weights" / "llama-3.1-8b-instruct"
    assert (chat.gpus_per_replica, chat.max_replicas, chat.max_batch_size) == (1, 4, 16)
    assert sft.checkpoint_dir == Path("/srv/base")
    assert sft.adapter_dir == tmp_path / "adapters" / "sft"
    assert sft.engine == "transformers"


def test_a_models_file_entry_takes_every_option_a_registration_takes(tmp_path: Path) -> None:
    # One declaration: every shape a model's options take has them with the same bounds.
    for shape in (ModelSpec, LLMAppConfig, RegisterModelRequest, ModelInfo):
        for name, field in ReplicaOptions.model_fields.items():
            mine = shape.model_fields[name]
            assert (mine.annotation, mine.metadata) == (field.annotation, field.metadata), name
    (spec,) = load_models_file(
        _write(
            tmp_path,
            """
models:
  - name: a
    kind: llm
    checkpoint_dir: /a
    device: cpu
    dtype: bfloat16
    cpus_per_replica: 2
    initial_replicas: 1
    max_queued_requests: 9
    batch_wait_timeout_s: 0.05
    upscale_delay_s: 1
    downscale_delay_s: 60
    look_back_period_s: 20
""",
        )
    )
    assert (spec.kind, spec.device, spec.dtype, spec.cpus_per_replica) == (
        "llm",
        "cpu",
        "bfloat16",
        2,
    )
    assert (spec.initial_replicas, spec.max_queued_requests, spec.batch_wait_timeout_s) == (
        1,
        9,
        0.05,
    )
    assert (spec.upscale_delay_s, spec.downscale_delay_s, spec.look_back_period_s) == (1, 60, 20)
    config = spec.app_config(app_name="llm-a")
    assert {name: config[name] for name in ReplicaOptions.model_fields} == spec.option_values()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: [unclosed", "not valid YAML"),
        ("- name: x", "expected a mapping with one key, 'models'"),
        ("models: []\nextra: 1", "expected a mapping with one key, 'models'"),
        (
            "models:\n  - {name: a, checkpoint_dir: /a}\n  - {name: b, checkpoint_dir: /b, gpu: 1}",
            "entry 2 ('b'): gpu: Extra inputs are not permitted",
        ),
        ("models:\n  - {name: 'bad name', checkpoint_dir: /a}", "entry 1 ('bad name'): name:"),
        ("models:\n  - {name: a}", "entry 1 ('a'): checkpoint_dir: Field required"),
        (
            "models:\n  - {name: a, checkpoint_dir: /a, min_replicas: 3, max_replicas: 2}",
            "max_replicas must be at least min_replicas",
        ),
        (
            "models:\n  - {name: a, checkpoint_dir: /a, aliases: [a]}",
            "aliases must be distinct",
        ),
        (
            "models:\n  - {name: a, checkpoint_dir: /a, aliases: [x]}\n"
            "  - {name: x, checkpoint_dir: /b}",
            "entry 2 ('x'): the name 'x' is already used by entry 1",
        ),
        (
            "models:\n  - {name: a, checkpoint_dir: /a, kind: classifier, engine: vllm}",
            "entry 1 ('a'): engine: 'vllm' is not available for classifier models yet "
            "(available: transformers)",
        ),
        (
            "models:\n  - {name: a, checkpoint_dir: /a, kind: embedding, adapter_dir: /b}",
            "adapter_dir is for llm models; kind embedding is served without one",
        ),
        (
            "models:\n  - {name: a, checkpoint_dir: /a, kind: poem}",
            "entry 1 ('a'): kind:",
        ),
    ],
)
def test_models_file_errors_name_the_file_and_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ModelsFileError) as caught:
        load_models_file(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_the_embedded_default_answers_to_the_spec_names(tmp_path: Path) -> None:
    demo, reward, embedding, llama_guard, prompt_guard = embedded_default(tmp_path)
    assert (demo.name, demo.kind) == ("demo", "llm")
    assert set(SPEC_MODEL_NAMES) <= set(demo.aliases)
    assert demo.checkpoint_dir == tmp_path / "models" / "demo"
    assert (demo.cpus_per_replica, demo.min_replicas, demo.max_replicas) == (0.5, 1, 2)
    assert (reward.name, reward.kind, reward.aliases) == (
        "demo-reward",
        "reward",
        ["llama3_405b_reward"],
    )
    assert reward.checkpoint_dir == tmp_path / "models" / "demo-reward"
    assert (reward.cpus_per_replica, reward.min_replicas, reward.max_replicas) == (0.25, 1, 1)
    assert (embedding.name, embedding.kind, embedding.aliases) == (
        "all-minilm-l6-v2",
        "embedding",
        [],
    )
    # The package's own directory: nothing is built for it.
    assert (embedding.checkpoint_dir / "modules.json").is_file()
    assert (embedding.cpus_per_replica, embedding.min_replicas, embedding.max_replicas) == (
        0.25,
        1,
        1,
    )
    assert embedding.name == Settings().memory_embedding_model
    # The demo guard models behind the shields, small and single.
    assert (llama_guard.name, llama_guard.kind) == ("demo-llama-guard", "llm")
    assert (prompt_guard.name, prompt_guard.kind) == ("demo-prompt-guard", "classifier")
    for guard in (llama_guard, prompt_guard):
        assert guard.checkpoint_dir == tmp_path / "models" / guard.name
        assert (guard.cpus_per_replica, guard.min_replicas, guard.max_replicas) == (0.25, 1, 1)


def test_load_catalog(tmp_path: Path) -> None:
    home = tmp_path / "home"
    catalog = load_catalog(Settings(home=home))
    assert [m.name for m in catalog.models] == [
        "demo",
        "demo-reward",
        "all-minilm-l6-v2",
        "demo-llama-guard",
        "demo-prompt-guard",
    ]
    assert catalog.embedded_default
    assert catalog.demo_model_dir == home / "models" / "demo"
    assert catalog.demo_reward_dir == home / "models" / "demo-reward"
    assert not catalog.demo_model_dir.exists()  # built at start-up, not here
    assert not catalog.demo_reward_dir.exists()

    home.mkdir()
    (home / "models.yaml").write_text("models:\n  - {name: mine, checkpoint_dir: /w}\n")
    catalog = load_catalog(Settings(home=home))
    assert ([m.name for m in catalog.models], catalog.demo_model_dir) == (["mine"], None)
    assert catalog.demo_reward_dir is None

    with pytest.raises(ModelsFileError, match="no such file"):
        load_catalog(Settings(home=home, models_file=tmp_path / "missing.yaml"))


def test_app_names_are_unique_per_tenant() -> None:
    assert file_app_name("demo") == "llm-demo"
    a, b = tenant_app_name("a b", "m"), tenant_app_name("a_b", "m")
    assert a != b
    assert a.startswith("llm-m@a_b-") and b.startswith("llm-m@a_b-")
    assert tenant_app_name("a b", "m") == a  # stable across restarts
    assert "@" in tenant_app_name("default", "x") and "@" not in file_app_name("x")
    assert len(tenant_app_name("t" * 64, "n" * 128)) < 200


def test_app_config_builds_the_named_app(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", checkpoint_dir=tmp_path, max_batch_size=4, max_replicas=3)
    app_name = tenant_app_name("alpha", "m")
    config = LLMAppConfig.model_validate(spec.app_config(app_name=app_name))
    assert config.app_name == app_name
    assert (config.model_dir, config.max_batch_size, config.max_replicas) == (tmp_path, 4, 3)
    with pytest.raises(ValueError, match="must start with 'llm-'"):
        spec.app_config(app_name="m")


def test_a_reward_spec_builds_a_reward_app_and_an_llm_spec_its_own(tmp_path: Path) -> None:
    weights = {"helpfulness": 1.0, "verbosity": -0.5}
    reward = ModelSpec(name="r", kind="reward", checkpoint_dir=tmp_path, score_weights=weights)
    config = RewardAppConfig.model_validate(reward.app_config(app_name="llm-r"))
    assert (config.name, config.model_dir, config.score_weights) == ("r", tmp_path, weights)
    # The LLM config forbids keys it does not take: an LLM's config has no score_weights.
    llm_config = ModelSpec(name="m", checkpoint_dir=tmp_path).app_config(app_name="llm-m")
    assert "score_weights" not in llm_config
    LLMAppConfig.model_validate(llm_config)
    with pytest.raises(ValidationError):
        LLMAppConfig.model_validate(llm_config | {"score_weights": weights})


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"score_weights": {"a": 1.0}}, "score_weights is for reward models"),
        ({"kind": "reward", "adapter_dir": "/adapter"}, "is served without one"),
        ({"kind": "reward", "score_weights": {}}, "at least 1"),
        ({"kind": "reward", "score_weights": {"a": float("nan")}}, "finite"),
    ],
)
def test_model_specs_refuse_misplaced_score_weights(
    tmp_path: Path, fields: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        ModelSpec.model_validate({"name": "m", "checkpoint_dir": str(tmp_path)} | fields)


def test_model_specs_refuse_unknown_fields(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({"name": "m", "checkpoint_dir": "/x", "runtime_env": {}})
