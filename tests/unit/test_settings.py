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
