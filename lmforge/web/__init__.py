"""The web interface: a chat page for `lmforge serve --ui` and a runs browser for `lmforge ui`.

Plain HTML/CSS/JS files in `static/`, served as they are (no build step, no CDN: the page works
offline and weighs a few tens of KB). Every page is sent with a Content-Security-Policy that allows
scripts only from this server and no inline script at all, so text that reaches the DOM from a
model or a file cannot run even if an escaping bug let it through; the pages themselves only ever
insert text with `textContent` or through an escaping Markdown renderer.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response

STATIC = Path(__file__).parent / "static"

# 'self' only; data: images for the canvas export; no inline script, no eval, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def add_security_headers(app: FastAPI) -> None:
    """CSP, no MIME sniffing and no referrer on every response of `app`."""

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response


def static_file(name: str) -> Response:
    """A file of `static/` by its bare name (no sub-paths: a name with a separator, or one that
    is not there, is a 404)."""
    path = STATIC / name
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    kind = _TYPES.get(path.suffix, "application/octet-stream")
    # Revalidated on each load (ETag from FileResponse): a new lmforge version is never stale.
    return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})


def add_static(app: FastAPI, index: str) -> None:
    """`/` serves `index` (an HTML file of static/), `/static/NAME` any file of static/."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root():
        return static_file(index)

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str):
        return static_file(name)

    add_security_headers(app)
