"""`hostgpu share`'s time limit: --hours, --until HH:MM (the next such time) or an ISO time."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
import typer

from hostgpu.cli.models import _deadline


def test_hours_and_until() -> None:
    assert _deadline(None, None) is None
    assert abs(_deadline(2, None) - (time.time() + 7200)) < 5  # type: ignore[operator]
    soon = datetime.now() + timedelta(minutes=30)
    at = _deadline(None, soon.strftime("%H:%M"))
    assert at is not None and 0 < at - time.time() <= 31 * 60
    past = datetime.now() - timedelta(minutes=30)
    at = _deadline(None, past.strftime("%H:%M"))  # already passed today: tomorrow's
    assert at is not None and 23 * 3600 < at - time.time() <= 24 * 3600
    iso = (datetime.now() + timedelta(hours=5)).isoformat(timespec="seconds")
    at = _deadline(None, iso)
    assert at is not None and abs(at - (time.time() + 5 * 3600)) < 5


@pytest.mark.parametrize("bad", ["25:00", "noon", "2026-13-01T00:00"])
def test_bad_until_says_what_to_write(bad: str) -> None:
    with pytest.raises(typer.BadParameter, match="HH:MM"):
        _deadline(None, bad)


def test_hours_and_until_together_is_an_error() -> None:
    with pytest.raises(typer.BadParameter, match="not both"):
        _deadline(1, "12:00")


def test_until_in_the_past_is_an_error() -> None:
    with pytest.raises(typer.BadParameter, match="passed already"):
        _deadline(None, "2020-01-01T00:00")
