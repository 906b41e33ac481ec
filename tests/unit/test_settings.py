"""Settings come from the environment through one model: what an empty variable means."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostgpu.inference.models import model_cache_dir
from hostgpu.settings import Settings


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HOSTGPU_MODEL_CACHE", "HOSTGPU_STACK_COMPOSE_FILE", "HOSTGPU_TOKEN_FILE"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("DEVICE", "")
    monkeypatch.setenv("HOSTGPU_HOME", str(tmp_path))
    settings = Settings()
    assert settings.model_cache is None and settings.stack_compose_file is None
    assert settings.token_file is None
    assert settings.device == "auto"
    assert model_cache_dir() == tmp_path / "models"  # not "." (the current folder)
    monkeypatch.setenv("HOSTGPU_MODEL_CACHE", str(tmp_path / "cache"))
    assert model_cache_dir() == tmp_path / "cache"


def test_a_bad_variable_is_a_config_error_that_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from hostgpu.errors import ConfigError
    from hostgpu.settings import get_settings

    monkeypatch.setenv("DEVICE", "bogus")
    monkeypatch.setenv("HOSTGPU_PORT", "abc")
    with pytest.raises(ConfigError) as raised:
        get_settings()
    assert "DEVICE='bogus'" in str(raised.value) and "HOSTGPU_PORT='abc'" in str(raised.value)
