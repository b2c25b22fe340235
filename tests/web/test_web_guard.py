"""The web apps' guard (lmforge.web.WebGuard): security headers on every response, requests to
other host names refused when there is no API key (DNS rebinding), and client disconnects still
reaching the server's handlers."""

from __future__ import annotations

import http.client

import pytest

from lmforge.infer.server import Server, create_app
from lmforge.web import _host_name
from lmforge.web.runs import create_runs_app


def get(url: str, path: str, host: str | None = None, key: str | None = None):
    netloc = url.split("//", 1)[1]
    conn = http.client.HTTPConnection(netloc, timeout=10)
    headers = {"Host": host or netloc}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


HOSTS = [
    ("localhost:8000", "localhost"),
    ("[::1]:80", "[::1]"),
    ("127.0.0.1", "127.0.0.1"),
    ("evil.example:8000", "evil.example"),
    ("::1", "::1"),
]


@pytest.mark.parametrize("host, name", HOSTS)
def test_host_names(host, name):
    assert _host_name(host) == name


def test_runs_browser_answers_only_local_host_names_without_a_key(tmp_path, serve_app):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with serve_app(create_runs_app(tmp_path)) as (url, _):
        for path in ("/", "/api/runs", "/static/runs.js"):
            status, headers, _ = get(url, path)
            assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
            status, headers, body = get(url, path, host="attacker.example:80")
            assert status == 403 and b"localhost" in body
            assert headers["x-content-type-options"] == "nosniff"  # refusals carry them too
        assert get(url, "/api/runs", host=f"localhost:{url.rsplit(':', 1)[1]}")[0] == 200
    # With an API key the server may be reached by any name; the key guards it instead.
    with serve_app(create_runs_app(tmp_path, api_key="sk-k")) as (url, _):
        assert get(url, "/api/runs", host="runs.lab.example")[0] == 401
        assert get(url, "/api/runs", host="runs.lab.example", key="sk-k")[0] == 200


def test_chat_page_server_checks_host_names_only_with_the_ui(chat_model, serve_app):
    model, tokenizer = chat_model
    with serve_app(create_app(Server(model, tokenizer, name="tiny"), ui=True)) as (url, _):
        assert get(url, "/v1/models")[0] == 200
        assert get(url, "/v1/models", host="attacker.example")[0] == 403
        assert get(url, "/", host="attacker.example")[0] == 403
    # The plain API server (no page) keeps answering any Host, as OpenAI clients expect.
    with serve_app(create_app(Server(model, tokenizer, name="tiny"))) as (url, _):
        assert get(url, "/v1/models", host="gpu-box.internal")[0] == 200


def test_disconnect_still_cancels_a_plain_answer_with_the_ui(
    chat_model, serve_app, abandon_request
):
    """The guard passes a client's disconnect through: an abandoned non-streamed request (the
    page sends those for self-consistency) frees its engine slot."""
    model, tokenizer = chat_model
    server = Server(model, tokenizer, name="tiny", default_max_tokens=100)
    engine = server.engine
    with serve_app(create_app(server, ui=True)) as (url, _):
        abandon_request(server, int(url.rsplit(":", 1)[1]))
        assert not engine.has_work() and engine.stats.cancelled == 1
        assert engine.stats.generated_tokens < 100
