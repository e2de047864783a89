from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import DEFAULT_TENANT, ApiKey, Settings


def test_defaults_live_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings = Settings(home=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'corral.db'}"
    assert settings.resolved_models_file == tmp_path / "models.yaml"
    assert settings.resolved_dataset_roots == (tmp_path / "datasets",)
    assert settings.ray_address is None
    assert settings.parsed_api_keys == ()


def test_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("CORRAL_DATABASE_URL", "postgresql://db/corral")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("CORRAL_API_KEYS", "acme:k1, bare-key ,beta:k:with:colons")
    monkeypatch.setenv("CORRAL_DATASET_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    settings = Settings()
    assert settings.home == tmp_path / "h"
    assert settings.resolved_database_url == "postgresql://db/corral"
    assert settings.ray_address == "10.0.0.5:6379"
    assert settings.parsed_api_keys == (
        ApiKey("acme", "k1"),
        ApiKey(DEFAULT_TENANT, "bare-key"),
        ApiKey("beta", "k:with:colons"),
    )
    assert settings.resolved_dataset_roots == (tmp_path / "a", tmp_path / "b")


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    with pytest.raises(ValueError, match="frozen"):
        settings.api_keys = "x"


@pytest.mark.parametrize("entry", [":k", "tenant:"])
def test_malformed_keys_are_refused(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        Settings(home=tmp_path, api_keys=entry)


def test_operator_keys_are_parsed_like_api_keys_and_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_API_KEYS", "acme:k1")
    monkeypatch.setenv("CORRAL_OPERATOR_KEYS", "ops:k2, bare-op")
    settings = Settings(home=tmp_path)
    assert settings.parsed_api_keys == (ApiKey("acme", "k1"),)
    assert settings.parsed_operator_keys == (
        ApiKey("ops", "k2", operator=True),
        ApiKey(DEFAULT_TENANT, "bare-op", operator=True),
    )
    assert settings.bearer_keys == settings.parsed_api_keys + settings.parsed_operator_keys


def test_a_key_cannot_be_both_a_tenants_and_an_operators(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both CORRAL_API_KEYS and CORRAL_OPERATOR_KEYS"):
        Settings(home=tmp_path, api_keys="acme:same", operator_keys="ops:same")
    with pytest.raises(ValueError, match="malformed CORRAL_OPERATOR_KEYS"):
        Settings(home=tmp_path, operator_keys="ops:")
