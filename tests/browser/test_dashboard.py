"""The dashboard in a real browser: sign in, live updates, job detail, actions, phone width,
light and dark, and the banner when the gateway goes away (last: it stops the gateway).

Screenshots of each view land in tests/browser/artifacts/ (ignored by git).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hostgpu.jobs import Job, JobSpec, JobState, Payload
from tests.browser.conftest import no_raw_values
from tests.conftest import Gateway, Worker

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips (or, in CI, fails) and says why
    expect = None

pytestmark = pytest.mark.slow
TIMEOUT_MS = 20_000
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def submit(gateway: Gateway, function: str, *args: object) -> Job:
    with gateway.client() as api:
        return api.submit(
            JobSpec(function=f"tests.e2efuncs:{function}", payload=Payload(args=list(args)))
        )


def wait_state(gateway: Gateway, job_id: str, *states: JobState, timeout: float = 30) -> Job:
    with gateway.client() as api:
        job = api.get(job_id, wait=timeout)
    assert job.state in states, job
    return job


@pytest.fixture
def page(browser: Any, stack: tuple[Gateway, Worker]) -> Iterator[Any]:
    """A page signed in as admin (the token put in sessionStorage, as the form does)."""
    gateway, _ = stack
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(f"sessionStorage.setItem('hostgpu.token', {gateway.token!r})")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()
    # The gateway stopped (the last test): its event stream and reads break, as they should.
    gone = ("Failed to fetch", "ERR_CONNECTION", "ERR_INCOMPLETE_CHUNKED_ENCODING")
    real = [e for e in errors if not any(g in e for g in gone)]
    assert not real, f"errors in the page: {real}"


def open_view(page: Any, gateway: Gateway, view: str) -> None:
    page.goto(f"{gateway.url}/#/{view}")
    page.locator(".top .live.on, .top .live.poll").wait_for()
    section = "job" if view.startswith("jobs/") else view.split("?")[0]
    page.locator(f"section[data-view='{section}']").wait_for()


def shot(page: Any, artifacts: Path, name: str, *, full_page: bool = True) -> None:
    page.wait_for_timeout(300)  # let Alpine settle
    no_raw_values(page)
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=full_page)


def test_sign_in_with_the_admin_token(
    browser: Any, stack: tuple[Gateway, Worker], artifacts: Path
) -> None:
    gateway, _ = stack
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(gateway.url + "/")
        token = page.locator("#token")
        assert token.get_attribute("type") == "password"
        assert "admin-token" in page.locator(".signin").inner_text()
        page.screenshot(path=str(artifacts / "signin.png"))
        token.fill("hga_not-a-real-token")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("The gateway refused this token").wait_for()
        token.fill(gateway.token)
        page.get_by_role("button", name="Sign in").click()
        page.locator(".top .who .scope").get_by_text("admin").wait_for()
        assert page.evaluate("sessionStorage.getItem('hostgpu.token')") == gateway.token
        assert page.evaluate("localStorage.length") == 0 or page.evaluate(
            "Object.keys(localStorage).every(k => k === 'hostgpu.theme')"
        )
        page.reload()  # the token survives a reload of the tab
        page.locator(".top .who .scope").get_by_text("admin").wait_for()
        page.get_by_role("button", name="Sign out").click()
        page.locator("#token").wait_for()
        assert page.evaluate("sessionStorage.getItem('hostgpu.token')") is None
    finally:
        context.close()


def test_overview_shows_states_queues_and_charts(
    page: Any, stack: tuple[Gateway, Worker], artifacts: Path
) -> None:
    gateway, _ = stack
    done = submit(gateway, "add", 2, 3)
    failed = submit(gateway, "boom", "for the chart")
    waiting = submit(gateway, "needs_mps")
    wait_state(gateway, done.id, JobState.succeeded)
    wait_state(gateway, failed.id, JobState.failed)
    open_view(page, gateway, "overview")
    queue = page.locator(".queue").filter(has_text="mps")
    queue.get_by_text("waiting: no worker with mps").wait_for()
    assert "Fix:" in queue.inner_text() and "hostgpu worker" in queue.inner_text()
    page.locator("[data-testid=throughput-chart] canvas").wait_for()
    page.locator("[data-testid=wait-chart] canvas").wait_for()
    assert int(page.locator(".state-chip.st-succeeded .n").inner_text()) >= 1
    shot(page, artifacts, "overview")
    with gateway.client() as api:
        api.cancel(waiting.id)


def test_a_job_submitted_through_the_api_appears_without_reload(
    page: Any, stack: tuple[Gateway, Worker], artifacts: Path
) -> None:
    gateway, _ = stack
    open_view(page, gateway, "jobs")
    page.wait_for_timeout(500)
    job = submit(gateway, "sleepy", 1.5)
    row = page.locator(f".job-row[data-job='{job.id}']")
    row.wait_for()
    row.locator(".badge.st-succeeded").wait_for()  # ... and moves on without a reload
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    shot(page, artifacts, "jobs")


def test_filters_and_paging(page: Any, stack: tuple[Gateway, Worker]) -> None:
    gateway, _ = stack
    with gateway.client() as api:
        ids = api.submit_batch(
            [JobSpec(function="tests.e2efuncs:add", payload=Payload(args=[i])) for i in range(60)]
        )
        api.wait(ids[-1:], timeout=30)
    open_view(page, gateway, "jobs?function=tests.e2efuncs:add")
    expect(page.locator(".job-row[data-job]")).to_have_count(50)
    page.get_by_test_id("older").click()
    page.get_by_text("51–").wait_for()
    page.get_by_role("button", name="← Newer").click()
    page.get_by_text("1–50").wait_for()
    page.get_by_test_id("filter-id").fill(ids[7][:10])
    page.locator(f".job-row[data-job='{ids[7]}']").wait_for()
    expect(page.locator(".job-row[data-job]")).to_have_count(1)
    page.get_by_test_id("filter-id").fill("not-hex")
    page.get_by_text("Job ids are hexadecimal").wait_for()


def test_a_failed_job_shows_its_remote_traceback(
    page: Any, stack: tuple[Gateway, Worker], artifacts: Path
) -> None:
    gateway, _ = stack
    # What a job says is text, never markup, in an admin's browser.
    job = submit(gateway, "boom", "<img src=x onerror=alert(1)> went wrong")
    wait_state(gateway, job.id, JobState.failed)
    open_view(page, gateway, f"jobs/{job.id}")
    error = page.get_by_test_id("job-error")
    error.locator(".error-line").get_by_text("<img src=x onerror=alert(1)> went wrong").wait_for()
    traceback = page.get_by_test_id("traceback").inner_text()
    assert "Traceback" in traceback and "raise ValueError(message)" in traceback
    assert page.locator("img").count() == 0
    assert page.get_by_test_id("job-state").inner_text() == "failed"
    page.get_by_test_id("rerun").wait_for()  # an admin may run it again
    page.locator(".attempts").get_by_text("gpu-box-1").wait_for()
    shot(page, artifacts, "job-failed")


def test_cancel_a_running_job_from_the_page(
    page: Any, stack: tuple[Gateway, Worker], artifacts: Path
) -> None:
    gateway, _ = stack
    job = submit(gateway, "sleepy", 60)
    open_view(page, gateway, f"jobs/{job.id}")
    page.get_by_test_id("job-state").get_by_text("running").wait_for()
    shot(page, artifacts, "job-running")
    page.get_by_test_id("cancel").click()
    page.get_by_test_id("confirm").click()
    page.get_by_test_id("job-state").get_by_text("cancelled").wait_for()
    assert wait_state(gateway, job.id, JobState.cancelled).error is not None
    shot(page, artifacts, "job-cancelled")


def test_requeue_a_running_job_from_the_page(page: Any, stack: tuple[Gateway, Worker]) -> None:
    gateway, _ = stack
    job = submit(gateway, "sleepy", 60)
    open_view(page, gateway, f"jobs/{job.id}")
    page.get_by_test_id("job-state").get_by_text("running").wait_for()
    page.get_by_test_id("requeue").click()
    page.get_by_test_id("confirm").click()
    page.locator(".attempts").get_by_text("requeued").wait_for()
    with gateway.client() as api:
        again = api.get(job.id)
        assert again.failures == 0 and again.lost == 0
        api.cancel(job.id)


def test_a_read_token_sees_everything_and_can_do_nothing(
    browser: Any, stack: tuple[Gateway, Worker]
) -> None:
    gateway, _ = stack
    with gateway.client() as api:
        reader = api.create_token("viewer", "read").token
    job = submit(gateway, "sleepy", 30)
    context = browser.new_context(viewport=DESKTOP)
    context.add_init_script(f"sessionStorage.setItem('hostgpu.token', {reader!r})")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        open_view(page, gateway, f"jobs/{job.id}")
        page.get_by_test_id("job-state").get_by_text("running").wait_for()
        page.wait_for_timeout(300)
        assert not page.get_by_test_id("cancel").is_visible()
        assert not page.get_by_test_id("requeue").is_visible()
        assert page.locator(".top .who").inner_text().strip().endswith("read")
    finally:
        context.close()
        with gateway.client() as api:
            api.cancel(job.id)


def test_fleet_cards(page: Any, stack: tuple[Gateway, Worker], artifacts: Path) -> None:
    gateway, worker = stack
    open_view(page, gateway, "fleet")
    card = page.get_by_test_id("worker-card").filter(has_text=worker.name)
    card.wait_for()
    text = card.inner_text()
    assert "cpu" in text.lower() and "tests.e2efuncs" in text and "Heartbeat" in text
    shot(page, artifacts, "fleet")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_width_has_no_horizontal_scroll(
    browser: Any, stack: tuple[Gateway, Worker], artifacts: Path, scheme: str
) -> None:
    gateway, _ = stack
    failed = submit(gateway, "boom", "a long message " * 20)
    wait_state(gateway, failed.id, JobState.failed)
    context = browser.new_context(viewport=PHONE, color_scheme=scheme, is_mobile=True)
    context.add_init_script(f"sessionStorage.setItem('hostgpu.token', {gateway.token!r})")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        for view in ("overview", "fleet", "jobs", f"jobs/{failed.id}"):
            open_view(page, gateway, view)
            page.wait_for_timeout(400)
            widths = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1], f"{view} scrolls sideways at 390 px: {widths}"
            name = view.split("/")[0] + ("-detail" if "/" in view else "")
            shot(page, artifacts, f"phone-{scheme}-{name}", full_page=False)
    finally:
        context.close()


def test_dark_desktop(browser: Any, stack: tuple[Gateway, Worker], artifacts: Path) -> None:
    gateway, _ = stack
    context = browser.new_context(viewport=DESKTOP, color_scheme="dark")
    context.add_init_script(f"sessionStorage.setItem('hostgpu.token', {gateway.token!r})")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        for view in ("overview", "jobs"):
            open_view(page, gateway, view)
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background != "rgb(246, 247, 249)", "dark scheme shows the light background"
            shot(page, artifacts, f"dark-{view}")
    finally:
        context.close()


def test_the_page_is_served_offline_with_a_strict_policy(stack: tuple[Gateway, Worker]) -> None:
    gateway, _ = stack
    page = httpx.get(gateway.url + "/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-eval" not in policy
    assert "http" not in page.text.replace(gateway.url, ""), "no external URL in the page"
    for asset in ("app.js", "app.css", "vendor/alpine-csp.min.js", "vendor/uPlot.iife.min.js"):
        assert httpx.get(f"{gateway.url}/dashboard/{asset}").status_code == 200, asset


def test_gateway_stopped_shows_the_banner(
    page: Any, stack: tuple[Gateway, Worker], artifacts: Path
) -> None:
    """Last in the module: it stops the shared gateway."""
    gateway, _ = stack
    open_view(page, gateway, "overview")
    banner = page.get_by_test_id("offline-banner")
    assert not banner.is_visible()
    gateway.stop()
    banner.wait_for(state="visible")
    assert "Cannot reach the gateway" in banner.inner_text()
    page.locator("main.content.stale").wait_for()
    page.locator(".top .live.off").wait_for()
    shot(page, artifacts, "offline")
