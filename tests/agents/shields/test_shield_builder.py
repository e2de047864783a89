"""ShieldBuilder refuses (422) every shield that could not judge: no model configured or
named, an unknown model, a model of the wrong kind, bad params; and code_guard only when
its module exists."""

from __future__ import annotations

from typing import Any

import pytest

from corral.agents.shields import LlamaGuardShield, PromptGuardShield, ShieldBuilder
from corral.api.common import ShieldConfig
from corral.config import Settings
from corral.errors import InvalidRequest, NotFound
from serve_apps.options import ModelKind

MODELS: dict[str, ModelKind] = {
    "guard": "llm",
    "classifier": "classifier",
    "demo-llama-guard": "llm",
}


class Router:
    """Resolves the names in MODELS, as `corral.serving.resolver` does."""

    def handle_for(self, *, tenant: str, model: str, kind: ModelKind = "llm") -> Any:
        if tenant != "alpha" or model not in MODELS:
            raise NotFound(f"no model {model!r}")
        if MODELS[model] != kind:
            raise InvalidRequest(f"model {model!r} is {MODELS[model]}, not {kind}")
        return object()


def config(shield_type: str, **params: Any) -> ShieldConfig:
    return ShieldConfig.model_validate({"shield_type": shield_type, "params": params})


def build(shield: ShieldConfig, *, settings: Settings | None = None, **kwargs: Any) -> Any:
    builder = ShieldBuilder(settings or Settings(), Router(), **kwargs)
    return builder.build(shield, tenant="alpha")


def test_shields_are_built_from_params_or_settings() -> None:
    shield = build(config("llama_guard", model="guard", excluded_categories=["S2"]))
    assert isinstance(shield, LlamaGuardShield) and shield.model == "guard"
    configured = Settings(llama_guard_model="guard", prompt_guard_model="classifier")
    assert build(config("llama_guard"), settings=configured).model == "guard"
    prompt = build(config("prompt_guard", threshold=0.5), settings=configured)
    assert isinstance(prompt, PromptGuardShield) and prompt.model == "classifier"
    # The embedded default's demo guard stands in for an unset setting.
    assert build(config("llama_guard"), embedded_default=True).model == "demo-llama-guard"


@pytest.mark.parametrize(
    ("shield", "problem"),
    [
        (
            config("llama_guard"),
            "has no model: name one in params.model or configure CORRAL_LLAMA_GUARD_MODEL",
        ),
        (config("prompt_guard"), "configure CORRAL_PROMPT_GUARD_MODEL"),
        (config("llama_guard", model="nope"), "no model 'nope' for this tenant"),
        (config("llama_guard", model="classifier"), "is classifier, not llm"),
        (config("prompt_guard", model="guard"), "is llm, not classifier"),
        (config("prompt_guard", model="classifier", threshold=0), "params.threshold"),
        (config("prompt_guard", model="classifier", threshold=1.5), "params.threshold"),
        (config("llama_guard", model="guard", excluded_categories=["S99"]), "unknown categories"),
        (
            config(
                "llama_guard", model="guard", excluded_categories=[f"S{i}" for i in range(1, 15)]
            ),
            "every message pass",
        ),
        (config("llama_guard", model="guard", temperature=1), "params.temperature"),
    ],
)
def test_a_shield_that_could_not_judge_is_refused(shield: ShieldConfig, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem.replace("(", r"\(")):
        build(shield)


def test_another_tenant_cannot_use_the_model() -> None:
    with pytest.raises(InvalidRequest, match="no model 'guard'"):
        ShieldBuilder(Settings(), Router()).build(
            config("llama_guard", model="guard"), tenant="beta"
        )


def test_code_guard_is_built_and_its_bad_params_are_a_422() -> None:
    shield = build(config("code_guard"))
    assert shield.shield_type == "code_guard"
    with pytest.raises(InvalidRequest, match="shield code_guard: code_guard params take"):
        build(ShieldConfig(shield_type="code_guard", params={"ruless": ["weak-hash"]}))
