"""``/docs``: the interactive API page, served with no network.

FastAPI's default page loads Swagger UI from a CDN, so on a plane, behind a proxy or in an
air-gapped lab it is blank. The same Swagger UI ships in the ``swagger-ui-bundle`` package
(Apache-2.0); its files are served from ``/docs/static``. Public, like ``/openapi.json``: the
page holds no data, and its "Authorize" button takes a token for the calls it makes.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

STATIC = "/docs/static"


def install_docs(app: FastAPI) -> None:
    """Mount Swagger UI's files and the ``/docs`` page on ``app`` (created with docs_url=None)."""
    app.mount(STATIC, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC}/favicon-32x32.png",
        )
