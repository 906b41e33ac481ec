"""The dashboard: one static page and its assets, served by the gateway with no build step.

The page reads the same /v1 API as every client, with the token the viewer signs in with
(kept in the browser's sessionStorage, never in a cookie, so no other site can make the
browser act with it). Front-end libraries are vendored under ``vendor/`` with their licences
(see ``vendor/README.md``): nothing is fetched from a CDN, so it works offline.

A strict Content-Security-Policy allows scripts and styles from the gateway only (Alpine's
CSP build needs no ``eval``): job names, arguments, errors and tracebacks are written by
whoever submits jobs, and must never become markup or code in an admin's browser.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
INDEX = HERE / "index.html"
ASSETS = "/dashboard"

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def mount_dashboard(app: FastAPI) -> None:
    page = INDEX.read_text()

    @app.get("/", tags=["system"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The dashboard page (it asks the API with the token you sign in with)."""
        return HTMLResponse(page, headers=HEADERS)

    app.mount(ASSETS, StaticFiles(directory=HERE / "static", check_dir=True), name="dashboard")
