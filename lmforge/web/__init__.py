"""The web interface: a chat page for `lmforge serve --ui` and a runs browser for `lmforge ui`.

Plain HTML/CSS/JS files in `static/`, served as they are (no build step, no CDN: the page works
offline and weighs a few tens of KB). Every page is sent with a Content-Security-Policy that allows
scripts only from this server and no inline script at all, so text that reaches the DOM from a
model or a file cannot run even if an escaping bug let it through; the pages themselves only ever
insert text with `textContent` or through an escaping Markdown renderer.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders

STATIC = Path(__file__).parent / "static"

# 'self' only (data: images: the runs browser shows report images it fetched with the API key);
# no inline script, no eval, no framing.
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


LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def _host_name(host: str) -> str:
    """The name part of a Host header: 'localhost:8000' -> 'localhost', '[::1]:80' -> '[::1]'."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class WebGuard:
    """ASGI middleware of the web pages' apps: CSP, no MIME sniffing and no referrer on every
    response, and, when `local_only` (no API key), a 403 for any Host header that does not
    name this machine. Without that check a page on any web site could rebind its own domain
    name to 127.0.0.1 (DNS rebinding) and read the runs or use the model through the victim's
    browser. Pure ASGI rather than FastAPI's `@app.middleware("http")`: that wrapper hides a
    client's disconnect from the server's handlers, which need it to cancel abandoned
    generations."""

    def __init__(self, app, local_only: bool) -> None:
        self.app, self.local_only = app, local_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.local_only:
            host = Headers(scope=scope).get("host", "")
            if _host_name(host.strip().lower()) not in LOCAL_NAMES:
                refused = JSONResponse(
                    {"error": {"message": "this server answers only requests to localhost"}},
                    status_code=403,
                )
                return await refused(scope, receive, self._headers(send))
        return await self.app(scope, receive, self._headers(send))

    @staticmethod
    def _headers(send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
            await send(message)

        return with_headers


def static_file(name: str) -> Response:
    """A file of `static/` by its bare name (no sub-paths: a name with a separator, or one that
    is not there, is a 404)."""
    path = STATIC / name
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    kind = _TYPES.get(path.suffix, "application/octet-stream")
    # Revalidated on each load (ETag from FileResponse): a new lmforge version is never stale.
    return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})


def add_static(app: FastAPI, index: str, *, local_only: bool) -> None:
    """`/` serves `index` (an HTML file of static/), `/static/NAME` any file of static/; every
    response of `app` gets the WebGuard (`local_only`: the server has no API key)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root():
        return static_file(index)

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str):
        return static_file(name)

    app.add_middleware(WebGuard, local_only=local_only)
