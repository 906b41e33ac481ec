"""`hostgpu token`'s options, checked before any request is sent."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from hostgpu.cli import app
from hostgpu.cli import tokens as tokens_cli


class _Refused:
    """A client that fails the test if a command reaches the gateway."""

    def __enter__(self) -> _Refused:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def create_token(self, *args: Any, **kw: Any) -> Any:
        pytest.fail(f"a bad option reached the gateway: create_token{args} {kw}")


@pytest.mark.parametrize("value", ["", " ", "soon", "7x", "d", "nan", "inf", "-5m", "0", "0.5s"])
def test_a_bad_expires_is_a_usage_error(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_cli, "client", lambda *_: _Refused())
    done = CliRunner().invoke(app, ["token", "create", "--scope", "read", "--expires", value])
    assert done.exit_code == 2, done.output
    assert "--expires" in done.output and "12h" in done.output and "7d" in done.output
