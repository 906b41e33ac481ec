"""A real Docker engine for the stack tests: skipped with a reason when none answers, a
failure in CI (``CI=1``, where ``.ci/run`` starts ``../shared/docker/engine`` and sources its
env file: DOCKER_HOST, DOCKER_CONFIG, BASE_IMAGE, COMPOSE)."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

from hostgpu.stack.docker import DockerReport, check_docker, explain
from tests.conftest import IN_CI


def compose_choice() -> dict[str, str]:
    """The engine script's COMPOSE=v1|v2 as hostgpu's HOSTGPU_COMPOSE."""
    wanted = os.environ.get("HOSTGPU_COMPOSE") or os.environ.get("COMPOSE") or ""
    return {"HOSTGPU_COMPOSE": wanted} if wanted in ("v1", "v2") else {}


@pytest.fixture(scope="session")
def docker_engine() -> DockerReport:
    """The real engine's report; skip (or fail in CI) when it is not usable."""
    report = check_docker(env={**os.environ, **compose_choice()})
    if not report.ok:
        reason = "no usable Docker engine:\n" + explain(report)
        if IN_CI:
            pytest.fail(reason + "\n(.ci/run starts ../shared/docker/engine; did it fail?)")
        pytest.skip(reason.replace("\n", " "))
    return report


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, Any, None]:
    """A failing test that used a running stack gets its containers' and worker's logs."""
    outcome = yield
    report = outcome.get_result()
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and stack is not None and hasattr(stack, "logs"):
        try:
            report.sections.append(("hostgpu stack logs", stack.logs()))
        except Exception as exc:  # the logs are a help, never a second failure
            report.sections.append(("hostgpu stack logs", f"could not read them: {exc}"))
