"""Shields, built from an agent's `ShieldConfig` by `ShieldBuilder` (the
`ShieldFactory` of `corral.agents.protocols`).

- `llama_guard`: Llama Guard 3 on an `llm` model (`llama_guard.py`);
- `prompt_guard`: a benign / injection / jailbreak classifier (`prompt_guard.py`);
- `code_guard`: static rules over code in a message (`code_guard.py`).

A model-backed shield needs a model: its `params.model`, else the server's setting
(`CORRAL_LLAMA_GUARD_MODEL`, `CORRAL_PROMPT_GUARD_MODEL`; in the embedded default, the
demo guard models). With neither, building it is refused (422): a shield with nothing
behind it never passes messages silently. So is a model the tenant cannot use, a model
of the wrong kind, or params the shield does not take.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from corral.agents.protocols import Shield
from corral.agents.shields.errors import ShieldFailed
from corral.agents.shields.llama_guard import LlamaGuardParams, LlamaGuardShield
from corral.agents.shields.prompt_guard import PromptGuardParams, PromptGuardShield
from corral.api.common import ShieldConfig
from corral.config import Settings
from corral.errors import InvalidRequest, NotFound
from corral.services.inference import ModelRouter
from corral.serving.catalog import DEMO_LLAMA_GUARD_MODEL_NAME, DEMO_PROMPT_GUARD_MODEL_NAME
from serve_apps.options import ModelKind

P = TypeVar("P", bound=BaseModel)

__all__ = [
    "LlamaGuardShield",
    "PromptGuardShield",
    "ShieldBuilder",
    "ShieldFailed",
]


class ShieldBuilder:
    """Builds shields for tenants. `embedded_default`: the server runs the embedded
    default catalog (`Catalog.embedded_default`), whose demo guard models stand in for
    unset model settings."""

    def __init__(
        self, settings: Settings, router: ModelRouter, *, embedded_default: bool = False
    ) -> None:
        self._router = router
        self._llama_guard_model = settings.llama_guard_model or (
            DEMO_LLAMA_GUARD_MODEL_NAME if embedded_default else None
        )
        self._prompt_guard_model = settings.prompt_guard_model or (
            DEMO_PROMPT_GUARD_MODEL_NAME if embedded_default else None
        )

    def build(self, config: ShieldConfig, *, tenant: str) -> Shield:
        """The shield `config` describes, for `tenant`; InvalidRequest (422) when it cannot
        work. What needs the model's replica (a classifier's labels) is checked by
        `build_checked`."""
        if config.shield_type == "llama_guard":
            guard = _params(LlamaGuardParams, config)
            model = self._model(guard.model, self._llama_guard_model, config, tenant, "llm")
            return LlamaGuardShield(
                router=self._router, tenant=tenant, model=model, excluded=guard.excluded_categories
            )
        if config.shield_type == "prompt_guard":
            prompt = _params(PromptGuardParams, config)
            model = self._model(
                prompt.model, self._prompt_guard_model, config, tenant, "classifier"
            )
            return PromptGuardShield(
                router=self._router, tenant=tenant, model=model, threshold=prompt.threshold
            )
        if config.shield_type == "code_guard":
            return _code_guard(config)
        raise InvalidRequest(f"unknown shield_type {config.shield_type!r}")

    async def build_checked(self, config: ShieldConfig, *, tenant: str) -> Shield:
        """`build`, then ask the model's app what it is (a prompt_guard classifier's
        labels): what agent creation calls, so a wrong model is a 422 there and not a
        failure of every turn."""
        shield = self.build(config, tenant=tenant)
        if isinstance(shield, PromptGuardShield):
            await shield.verify()
        return shield

    def _model(
        self,
        named: str | None,
        configured: str | None,
        config: ShieldConfig,
        tenant: str,
        kind: ModelKind,
    ) -> str:
        model = named or configured
        if model is None:
            setting = f"CORRAL_{config.shield_type.upper()}_MODEL"
            raise InvalidRequest(
                f"shield {config.shield_type} has no model: name one in params.model or "
                f"configure {setting} (a shield without a model would pass every message)"
            )
        try:
            # Resolves the name and checks its kind: the same call each check makes.
            self._router.handle_for(tenant=tenant, model=model, kind=kind)
        except NotFound:
            raise InvalidRequest(
                f"shield {config.shield_type}: no model {model[:128]!r} for this tenant"
            ) from None
        except InvalidRequest as exc:
            raise InvalidRequest(f"shield {config.shield_type}: {exc.message}") from None
        return model


def _params(params_type: type[P], config: ShieldConfig) -> P:
    try:
        return params_type.model_validate(config.params)
    except ValidationError as exc:
        problems = "; ".join(
            f"params.{'.'.join(str(part) for part in err['loc']) or '(all)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidRequest(f"shield {config.shield_type}: {problems}") from None


def _code_guard(config: ShieldConfig) -> Shield:
    """code_guard's static rules (`corral.agents.shields.code_guard`); params it cannot
    take are a 422."""
    from corral.agents.shields.code_guard import build_code_guard

    try:
        return build_code_guard(dict(config.params))
    except ValueError as exc:
        raise InvalidRequest(f"shield code_guard: {exc}") from None
