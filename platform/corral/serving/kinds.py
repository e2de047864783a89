"""Which Serve app runs each model kind: one row per kind Corral can serve. A new kind
(embedding, classifier) is a `serve_apps/<kind>.py` with a `build_app` and its
own engines table, and one row here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ray.serve import Application

from serve_apps import embedding, llm, reward
from serve_apps.options import ModelKind

# `build_app(args, *, engine_factory=None)`: the app's config as a dict; an injected
# engine factory (tests) or None for the engine the config names.
AppBuilder = Callable[..., Application]


@dataclass(frozen=True)
class AppKind:
    build_app: AppBuilder
    # The engines this kind's app has (its config's `engine` must be one of them).
    engines: frozenset[str]


APP_KINDS: dict[ModelKind, AppKind] = {
    "llm": AppKind(build_app=llm.build_app, engines=frozenset(llm.ENGINES)),
    "reward": AppKind(build_app=reward.build_app, engines=frozenset(reward.ENGINES)),
    "embedding": AppKind(build_app=embedding.build_app, engines=frozenset(embedding.ENGINES)),
}


class NotServable(ValueError):
    """A model kind, or an engine for it, that this build cannot serve (yet)."""


def check_servable(kind: ModelKind, engine: str) -> AppKind:
    """The app kind that serves `kind` with `engine`; NotServable, saying what is
    available, otherwise."""
    app_kind = APP_KINDS.get(kind)
    if app_kind is None:
        raise NotServable(
            f"kind: {kind!r} models cannot be served yet (served kinds: {', '.join(APP_KINDS)})"
        )
    if engine not in app_kind.engines:
        raise NotServable(
            f"engine: {engine!r} is not available for {kind} models yet (available: "
            f"{', '.join(sorted(app_kind.engines))})"
        )
    return app_kind
