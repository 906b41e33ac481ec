"""Real Chromium (Debian's, through Playwright) against a real gateway and worker.

Playwright cannot download its own browsers here, so it drives ``/usr/bin/chromium`` (or
``HOSTGPU_CHROMIUM``). Without one the tests skip with the reason; in CI (``CI=1``) they
fail, and ``.ci/run`` installs Chromium first. The browser, the gateway and the worker are
shared by the module; each test gets a fresh browser context (its own sessionStorage).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, Gateway, Worker

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
RAW = re.compile(r"\b(null|undefined|NaN|\[object Object\])\b")


def _chromium() -> str | None:
    found = os.environ.get("HOSTGPU_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return found if Path(found).exists() else None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "the playwright package is not installed (pip install -e '.[dev]')"
    if why is None and executable is None:
        why = "no Chromium at /usr/bin/chromium (apt-get install chromium)"
    if why:
        if IN_CI:
            pytest.fail(f"browser tests must run in CI: {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Worker]]:
    home = tmp_path_factory.mktemp("dashboard-home")
    gateway = Gateway(
        home,
        f"sqlite:///{home / 'hostgpu.db'}",
        env_extra={"HOSTGPU_LEASE_SECONDS": "3"},
    ).start()
    worker = Worker(gateway, concurrency=2, name="gpu-box-1").start()
    try:
        yield gateway, worker
    finally:
        if gateway.proc is not None and gateway.proc.poll() is not None:
            worker.kill()  # the last test stopped the gateway: nothing to say goodbye to
        else:
            worker.stop()
        gateway.stop()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def no_raw_values(page: Any) -> None:
    """Nothing on the page reads null, undefined, NaN or [object Object]."""
    text = page.locator("body").inner_text()
    found = RAW.findall(text)
    assert not found, f"raw values on the page: {found}\n{text[:3000]}"
