"""The chat page of `lmforge serve --ui` (lmforge/web/static/chat.*), driven in headless Chromium
against the real server app with a tiny random-weight model.

Where a test needs known model text (Markdown, tool calls, votes, injection attempts) the
server's engine round is replaced by a script; where it needs a real generation in flight (the
streaming, stop and server-loss tests) the model is slowed down instead. Replies that the server
never sends (a stream cut short, errors of other shapes) come from a stand-in API.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.request

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from lmforge.infer.sequence import Generation
from lmforge.infer.server import Server, create_app
from lmforge.web import STATIC, add_static

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture then skips these tests (fails them under CI)
    expect = None

ASSISTANT = '[data-role="assistant"]'


def make_server(chat_model, api_key: str | None = None) -> Server:
    model, tokenizer = chat_model
    model.delay = 0.0
    return Server(
        model,
        tokenizer,
        name="tiny",
        api_key=api_key,
        max_batch=2,
        max_n=4,
        default_max_tokens=8,
    )


class Script:
    """Stands in for `server`'s engine round: each round answers with the next text, as if the
    model had written it, and the prompt of each round is recorded."""

    def __init__(self, server: Server, *texts: str) -> None:
        self.texts, self.prompts, self.tokenizer = list(texts), [], server.tokenizer
        server._round = self.round

    async def round(self, ids, params, sink) -> Generation:
        self.prompts.append(self.tokenizer.decode(ids))
        text = self.texts.pop(0)
        if sink is not None:
            sink(text)
        return Generation([1] * 3, text, "stop")


@pytest.fixture
def served(chat_model, serve_app):
    """(server, base URL, uvicorn server): a fresh Server with its own engine, chat page on."""
    server = make_server(chat_model)
    with serve_app(create_app(server, ui=True)) as (url, uv):
        yield server, url, uv
    chat_model[0].delay = 0.0


def open_chat(page, url: str) -> None:
    page.goto(url)
    expect(page.get_by_test_id("status")).to_have_text("Ready.")


def send(page, text: str) -> None:
    page.get_by_test_id("input").fill(text)
    page.get_by_test_id("send").click()


def answered(page, text: str | None = None):
    """The last assistant message once it is done (containing `text`, if given)."""
    answer = page.locator(ASSISTANT).last
    expect(answer).to_have_attribute("data-state", "done")
    if text is not None:
        expect(answer).to_contain_text(text)
    return answer


def sent_body(request) -> dict:
    return json.loads(request.value.post_data)


def test_answer_streams_token_by_token(page, served):
    server, url, _ = served
    server.engine.model.delay = 0.04
    open_chat(page, url)
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("top-p").fill("0.9")
    page.get_by_test_id("max-tokens").fill("30")
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "hello")
    body = sent_body(request)
    assert body["stream"] is True and body["model"] == "tiny"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0, 0.9, 30)
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    answer = page.locator(ASSISTANT).last
    states, lengths = set(), []
    deadline = time.time() + 15
    while time.time() < deadline:
        state = answer.get_attribute("data-state")
        states.add(state)
        if state != "streaming":
            break
        lengths.append(len(answer.get_by_test_id("message-body").text_content()))
        page.wait_for_timeout(80)
    assert states == {"streaming", "done"}
    final = len(answer.get_by_test_id("message-body").text_content())
    seen = sorted({n for n in lengths if 0 < n < final})
    assert len(seen) >= 2, f"no growth observed mid-stream: {lengths} -> {final}"
    assert lengths == sorted(lengths)
    expect(page.get_by_test_id("regenerate")).to_be_visible()
    assert page.errors == []


def test_stop_marks_the_answer_and_frees_the_engine(page, served):
    server, url, _ = served
    server.engine.model.delay = 0.05  # 200 tokens would take 10 s
    open_chat(page, url)
    page.get_by_test_id("max-tokens").fill("200")
    send(page, "hello")
    page.wait_for_function(
        """() => {
            const a = [...document.querySelectorAll('[data-role="assistant"]')].pop();
            return a && a.dataset.state === "streaming"
                && a.querySelector(".msg-body").textContent.length > 2;
        }"""
    )
    page.get_by_test_id("stop").click()
    answer = page.locator(ASSISTANT).last
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(answer.get_by_test_id("message-note")).to_contain_text("Stopped")
    expect(page.get_by_test_id("input")).to_be_editable()
    expect(page.get_by_test_id("send")).to_be_enabled()
    deadline = time.time() + 5
    while server.engine.has_work() and time.time() < deadline:
        time.sleep(0.02)
    with urllib.request.urlopen(url + "/health") as r:
        engine = json.loads(r.read())["engine"]
    assert not server.engine.has_work() and engine["cancelled"] == 1
    # The page goes on: the next message gets a full answer.
    server.engine.model.delay = 0.0
    page.get_by_test_id("max-tokens").fill("3")
    send(page, "again")
    answered(page)
    assert page.locator(ASSISTANT).count() == 2 and page.errors == []


def test_edit_last_message_and_regenerate(page, served):
    server, url, _ = served
    script = Script(server, "answer one", "answer two", "answer three")
    open_chat(page, url)
    page.get_by_test_id("system").fill("You are terse.")
    send(page, "first question")
    answered(page, "answer one")
    assert "You are terse." in script.prompts[0] and "first question" in script.prompts[0]

    page.get_by_test_id("edit").click()
    page.get_by_test_id("edit-input").fill("edited question")
    page.get_by_test_id("edit-save").click()
    answered(page, "answer two")
    assert "edited question" in script.prompts[1] and "first question" not in script.prompts[1]
    users = page.locator('[data-role="user"]').get_by_test_id("message-body")
    expect(users).to_have_text(["edited question"])

    page.get_by_test_id("regenerate").click()
    answered(page, "answer three")
    assert "edited question" in script.prompts[2]
    assert "answer two" not in script.prompts[2]  # the replaced answer is not in the history
    assert page.locator(ASSISTANT).count() == 1
    assert page.errors == []


def test_markdown_answer_renders_and_copies(page, served):
    server, url, _ = served
    answer_text = (
        "# Plan\n\nSome **bold** and `code`.\n\n- one\n- two\n\n"
        "| a | b |\n|---|--:|\n| 1 | 2 |\n\n```python\nprint('hi')\n```\n"
    )
    Script(server, answer_text)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    open_chat(page, url)
    send(page, "plan please")
    body = answered(page).get_by_test_id("message-body")
    expect(body.locator("h1")).to_have_text("Plan")
    expect(body.locator("strong")).to_have_text("bold")
    expect(body.locator("ul > li")).to_have_text(["one", "two"])
    expect(body.locator("table th")).to_have_text(["a", "b"])
    expect(body.locator("table td")).to_have_text(["1", "2"])
    expect(body.locator("pre code.language-python")).to_have_text("print('hi')")
    block = body.locator(".code-block")
    block.get_by_test_id("copy-code").click()
    expect(block.get_by_test_id("copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')"
    page.locator(ASSISTANT).last.get_by_test_id("copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == answer_text
    assert page.errors == []


def test_tool_calls_are_shown_inline(page, served):
    server, url, _ = served
    Script(server, "I compute <calc>2+3*4", " so the answer is 14.")
    open_chat(page, url)
    page.get_by_test_id("tool-calculator").check()
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "what is 2+3*4?")
    assert sent_body(request)["lmforge"]["tools"] == ["calculator"]
    answer = answered(page, "so the answer is 14.")
    call = answer.get_by_test_id("tool-call")
    expect(call).to_have_count(1)
    expect(call.locator(".tool-name")).to_have_text("calculator")
    expect(call.locator(".tool-arg")).to_have_text("2+3*4")
    expect(call.locator(".tool-result")).to_have_text("14")
    # The raw call syntax is replaced by the marked element, in the flow of the sentence.
    text = answer.get_by_test_id("message-body").text_content()
    assert "<calc>" not in text and text.startswith("I compute")
    assert page.errors == []


def test_self_consistency_shows_the_vote(page, served):
    server, url, _ = served
    Script(server, "so 5. The answer is 5.", "The answer is 7.", "#### 5")
    open_chat(page, url)
    page.get_by_test_id("self-consistency").fill("3")
    page.get_by_test_id("cot").select_option("zeroshot")
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "2+3?")
    body = sent_body(request)
    assert body["stream"] is False
    assert body["lmforge"]["self_consistency"] == 3 and body["lmforge"]["cot"] == "zeroshot"
    answer = answered(page, "The answer is 5.")
    vote = answer.get_by_test_id("vote")
    expect(vote.locator("strong")).to_have_text("5")
    expect(vote).to_contain_text("2/3 samples, 67%")
    expect(vote).to_contain_text("answers: 5, 7, 5")
    assert page.errors == []


def test_api_errors_are_shown_readably(page, served):
    _, url, _ = served
    open_chat(page, url)
    page.get_by_test_id("self-consistency").fill("3")
    page.get_by_test_id("temperature").fill("0")
    send(page, "vote with greedy samples")
    answer = page.locator(ASSISTANT).last
    expect(answer).to_have_attribute("data-state", "error")
    note = "The server refused the request: self_consistency needs temperature > 0 (HTTP 400)"
    expect(answer.get_by_test_id("message-note")).to_have_text(note)
    expect(page.get_by_test_id("status")).to_have_text(note)
    expect(page.get_by_test_id("send")).to_be_enabled()
    assert len(page.errors) == 1 and "400" in page.errors[0]  # the refused request itself


INJECTIONS = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=1">',
    "[x](javascript:window.__pwned=1)",
]


def test_model_text_cannot_inject_html_or_script(page, served):
    server, url, _ = served
    tricky = [
        "[y](JaVaScRiPt:window.__pwned=1)",
        "[z](data:text/html,<script>window.__pwned=1</script>)",
    ]
    answer_text = (
        f"# {INJECTIONS[1]}\n\n"
        + "\n\n".join(INJECTIONS + tricky)
        + f"\n\n| h |\n|---|\n| {INJECTIONS[0]} |\n"
        f"\n- {INJECTIONS[1]}\n\n`{INJECTIONS[0]}`\n"
    )
    Script(server, answer_text)
    open_chat(page, url)
    page.get_by_test_id("system").fill(INJECTIONS[0] + INJECTIONS[1])
    user_text = " ".join(INJECTIONS)
    send(page, user_text)
    answer = answered(page)
    messages = page.get_by_test_id("messages")
    expect(page.locator('[data-role="user"]').get_by_test_id("message-body")).to_have_text(
        user_text
    )
    text = answer.get_by_test_id("message-body").text_content()
    for literal in INJECTIONS + tricky:
        assert literal in text
    page.get_by_text(INJECTIONS[2], exact=True).click()
    page.get_by_text(tricky[0], exact=True).click()
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('script').length") == 2  # the page's own
    assert page.evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0
    assert messages.locator("a").count() == 0
    assert page.errors == []  # not even a blocked attempt (CSP reports would be errors)


def test_server_going_away_mid_stream_and_coming_back(page, served, chat_model, serve_app):
    server, url, uv = served
    server.engine.model.delay = 0.05
    open_chat(page, url)
    page.get_by_test_id("max-tokens").fill("200")
    send(page, "hello")
    page.wait_for_function(
        """() => {
            const a = [...document.querySelectorAll('[data-role="assistant"]')].pop();
            return a && a.querySelector(".msg-body").textContent.length > 2;
        }"""
    )
    uv.should_exit = True
    uv.force_exit = True
    answer = page.locator(ASSISTANT).last
    expect(answer).to_have_attribute("data-state", "error")
    expect(page.get_by_test_id("status")).to_contain_text("connection to the server was lost")
    expect(answer.get_by_test_id("message-note")).to_contain_text("incomplete")
    assert len(answer.get_by_test_id("message-body").text_content()) > 2  # the partial answer
    expect(page.get_by_test_id("input")).to_be_editable()
    expect(page.get_by_test_id("send")).to_be_enabled()

    # While the server is down, sending says so and leaves the page usable.
    port = int(url.rsplit(":", 1)[1])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            break
    send(page, "anyone?")
    expect(page.locator(ASSISTANT).last).to_have_attribute("data-state", "error")
    expect(page.get_by_test_id("status")).to_contain_text("connection was lost")

    # The server comes back on the same address (a restart): the same page carries on.
    server.engine.model.delay = 0.0
    back = make_server(chat_model)
    Script(back, "back again")
    with serve_app(create_app(back, ui=True), port=port) as (again, _):
        assert again == url
        send(page, "are you there?")
        answered(page, "back again")
    assert page.locator(ASSISTANT).count() == 3
    # Only the refused and broken requests themselves are logged, no script error.
    assert all(e.startswith("console: Failed to load resource") for e in page.errors)


def test_phone_width_has_no_horizontal_scrolling(page, served):
    server, url, _ = served
    long_line = "x = [" + ", ".join(str(i) for i in range(200)) + "]"
    wide_row = "| " + " | ".join(f"column{i}" for i in range(12)) + " |"
    Script(server, f"```python\n{long_line}\n```\n\n{'y' * 300}\n\n{wide_row}\n|" + "---|" * 12)
    page.set_viewport_size({"width": 390, "height": 844})
    open_chat(page, url)
    expect(page.get_by_test_id("system")).to_be_hidden()  # settings start folded away
    send(page, "wide things")
    answered(page)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth]")
    assert max(widths) <= 390, widths
    page.get_by_test_id("settings-toggle").click()
    system = page.get_by_test_id("system")
    expect(system).to_be_visible()
    box = page.get_by_test_id("settings").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    system.fill("Answer briefly.")
    page.get_by_test_id("settings-toggle").click()
    expect(system).to_be_hidden()
    expect(page.get_by_test_id("input")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.errors == []


def test_api_key_is_asked_for_and_used(page, chat_model, serve_app):
    server = make_server(chat_model, api_key="sk-ui")
    Script(server, "welcome")
    with serve_app(create_app(server, ui=True)) as (url, _):
        page.goto(url)
        expect(page.get_by_test_id("auth")).to_be_visible()
        expect(page.get_by_test_id("status")).to_contain_text("API key")
        page.get_by_test_id("api-key").fill("wrong")
        page.get_by_test_id("api-key-save").click()
        expect(page.get_by_test_id("auth")).to_be_visible()
        page.get_by_test_id("api-key").fill("sk-ui")
        page.get_by_test_id("api-key-save").click()
        expect(page.get_by_test_id("status")).to_have_text("Ready.")
        expect(page.get_by_test_id("auth")).to_be_hidden()
        expect(page.get_by_test_id("model")).to_have_text("tiny")
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "let me in")
        assert request.value.headers["authorization"] == "Bearer sk-ui"
        answered(page, "welcome")
    assert page.errors and all("401" in e for e in page.errors)  # the two refused requests


def test_conversation_is_kept_until_new_chat(page, served):
    server, url, _ = served
    Script(server, "remembered")
    open_chat(page, url)
    page.get_by_test_id("temperature").fill("0.3")
    send(page, "remember me")
    answered(page, "remembered")
    page.reload()
    expect(page.get_by_test_id("message")).to_have_count(2)
    expect(page.locator(ASSISTANT)).to_contain_text("remembered")
    expect(page.get_by_test_id("temperature")).to_have_value("0.3")
    page.get_by_test_id("new-chat").click()
    expect(page.get_by_test_id("message")).to_have_count(0)
    page.reload()
    expect(page.get_by_test_id("status")).to_have_text("Ready.")
    expect(page.get_by_test_id("message")).to_have_count(0)
    assert page.errors == []


def test_markdown_renderer_edge_cases(page, served):
    _, url, _ = served
    open_chat(page, url)
    html = page.evaluate(
        """([cases]) => cases.map(([text, opts]) => {
            const box = document.createElement("div");
            box.append(window.LmMarkdown.render(text, opts));
            return box.innerHTML;
        })""",
        [
            [
                ["```js\nlet a = 1;", {}],
                ["[a](javascript:alert(1)) [b](java\tscript:x) [c](https://e.org/x) [d](/v1)", {}],
                ["1. one\n2. two\n   - inner\n\n3. three", {}],
                ["> **q**\n\n---\n\n*em* _em_ snake_case 2 * 3 ~~del~~ `a<b>` `open", {}],
                ["one\ntwo", {}],
                ["one\ntwo", {"breaks": True}],
                ["| a | b |\n|:-|-:|\n| x \\| y | `z` |", {}],
                ["## Title ##\nsee <https://e.org/a> and http://e.org/b.", {}],
                ["![plot](loss.png)", {}],
                ["3. three\n4. four", {}],
            ]
        ],
    )
    assert html[0] == '<pre data-lang="js"><code class="language-js">let a = 1;</code></pre>'
    assert html[1] == (
        "<p>[a](javascript:alert(1)) [b](java\tscript:x) "
        '<a href="https://e.org/x" target="_blank" rel="noopener noreferrer">c</a> '
        f'<a href="{url}/v1">d</a></p>'
    )
    assert html[2] == (
        "<ol><li><p>one</p></li><li><p>two</p><ul><li>inner</li></ul></li>"
        "<li><p>three</p></li></ol>"
    )
    assert html[3] == (
        "<blockquote><p><strong>q</strong></p></blockquote><hr>"
        "<p><em>em</em> <em>em</em> snake_case 2 * 3 <del>del</del> <code>a&lt;b&gt;</code>"
        " `open</p>"
    )
    assert html[4] == "<p>one\ntwo</p>" and html[5] == "<p>one<br>two</p>"
    assert re.fullmatch(
        r'<div class="md-table" style="[^"]*"><table><thead><tr><th style="text-align: left;">a'
        r'</th><th style="text-align: right;">b</th></tr></thead><tbody><tr>'
        r'<td style="text-align: left;">x \| y</td><td style="text-align: right;"><code>z</code>'
        r"</td></tr></tbody></table></div>",
        html[6],
    ), html[6]
    assert html[7] == (
        '<h2>Title</h2><p>see <a href="https://e.org/a" target="_blank" '
        'rel="noopener noreferrer">https://e.org/a</a> and <a href="http://e.org/b" '
        'target="_blank" rel="noopener noreferrer">http://e.org/b</a>.</p>'
    )
    # Images are links unless asked for (a model must not make the page fetch addresses).
    assert html[8] == f'<p><a href="{url}/loss.png" class="md-image-link">plot</a></p>'
    assert html[9] == '<ol start="3"><li>three</li><li>four</li></ol>'
    # How the runs browser shows a report: relative addresses mapped to its file route, images
    # shown (here an existing file, so that loading it logs no error).
    report = page.evaluate(
        """() => {
            const box = document.createElement("div");
            box.append(window.LmMarkdown.render("![plot](chat.css) [r](b.md) [e](https://e.org)",
                {images: true, resolve: (u) => "static/" + u}));
            return box.innerHTML;
        }"""
    )
    assert report == (
        f'<p><img src="{url}/static/chat.css" alt="plot"> <a href="{url}/static/b.md">r</a> '
        '<a href="https://e.org/" target="_blank" rel="noopener noreferrer">e</a></p>'
    )
    assert page.errors == []


# Inputs that took seconds to render (each opener searched on to the end of the text, or a regex
# tried every split of a long run of blanks). None has any formatting to show: what comes out is
# the text as written, blanks and the heading's and code span's markers aside.
SLOW = [
    "*a " * 20000,
    "_a " * 20000,
    "**a " * 20000,
    "~~a " * 20000,
    "[x](" * 20000,
    "[" * 20000,
    "![" * 20000,
    "[x](a (" * 10000,
    "[x](" * 10000 + " " * 30000,
    "a\n" * 30000,
    "a" + " " * 60000 + "x\nb",
    "# a" + " " * 60000 + "x",
    "|a|\n|-" + " " * 60000 + "x",
    "` " + "a" * 60000 + "`",
]


def test_markdown_renderer_stays_fast_and_shallow(page, served):
    _, url, _ = served
    open_chat(page, url)
    timings = page.evaluate(
        r"""([cases]) => cases.map((text) => {
            const start = performance.now();
            const box = document.createElement("div");
            box.append(window.LmMarkdown.render(text));
            // An element: rendered, not the plain text that render() falls back to.
            return [performance.now() - start, box.firstElementChild !== null,
                    box.textContent.replace(/[\s#`]/g, "")];
        })""",
        [SLOW],
    )
    for text, (ms, rendered, shown) in zip(SLOW, timings):
        assert ms < 1000, (text[:12], ms)  # about 20 ms each now
        assert rendered and shown == re.sub(r"[\s#`]", "", text), text[:12]
    # Quotes and lists nest 32 deep at most, the rest is plain text; before, 10 KB of them
    # overflowed the stack. A tight item of 100,000 lines is whole too (its nodes were spread as
    # arguments, another stack overflow).
    nested = page.evaluate(
        """([cases]) => cases.map(([text, tag]) => {
            const box = document.createElement("div");
            box.append(window.LmMarkdown.render(text, {breaks: true}));
            return [box.querySelectorAll(tag).length, box.querySelectorAll("br").length,
                    box.textContent.length];
        })""",
        [
            [
                ["> " * 5000, "blockquote"],
                ["+ " * 5000, "ul"],
                ["- " * 5000 + "x", "ul"],
                ["1. " * 5000, "ol"],
                ["- " + "a\n" * 100_000, "ul > li"],
            ]
        ],
    )
    assert [n for n, _, _ in nested] == [32, 32, 32, 32, 1]
    assert nested[0][2] == len("> " * (5000 - 32))  # the rest, as written
    assert nested[4][1:] == [99_999, 100_000]
    # Whatever still fails leaves the text as written instead of an exception for the page.
    fallback = page.evaluate(
        """() => {
            const fragment = window.LmMarkdown.render("[x](y) *z*", {
                resolve: () => { throw new Error("resolver broke"); },
            });
            return [fragment.childNodes.length, fragment.firstChild.nodeType, fragment.textContent];
        }"""
    )
    assert fallback == [1, 3, "[x](y) *z*"]
    assert page.errors == []


def test_deeply_nested_answer_renders_and_is_restored(page, served):
    server, url, _ = served
    Script(server, "> " * 5000)
    open_chat(page, url)
    send(page, "quote yourself")
    answer = answered(page)
    expect(answer.locator("blockquote")).to_have_count(32)
    page.reload()
    expect(page.get_by_test_id("status")).to_have_text("Ready.")
    expect(page.locator(ASSISTANT).locator("blockquote")).to_have_count(32)
    assert page.errors == []


def test_answer_that_fails_to_render_shows_as_text(page, served):
    server, url, _ = served
    Script(server, "**bold** answer")
    # A renderer that always throws, in place of markdown.js's (its assignment is ignored).
    page.add_init_script(
        """Object.defineProperty(window, "LmMarkdown", {
            get: () => ({ render: () => { throw new Error("renderer broke"); } }),
            set: () => {},
        });"""
    )
    open_chat(page, url)
    send(page, "hello")
    body = answered(page).get_by_test_id("message-body")
    expect(body).to_have_text("**bold** answer")
    page.reload()  # the kept conversation is drawn before the page connects
    expect(page.get_by_test_id("status")).to_have_text("Ready.")
    expect(page.locator(ASSISTANT).get_by_test_id("message-body")).to_have_text("**bold** answer")
    assert page.errors == []


def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"delta": {"content": text}}]}) + "\n\n"


def fake_api(*replies: Response) -> FastAPI:
    """The chat page and a stand-in for the API it calls: each chat request gets the next of
    `replies`, sent as written."""
    app = FastAPI()
    add_static(app, "chat.html", local_only=True)
    pending = list(replies)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def completions():
        return pending.pop(0)

    return app


def test_stream_endings_and_error_shapes(page, serve_app):
    def sse(body: str) -> Response:
        return Response(body, media_type="text/event-stream")

    app = fake_api(
        # [DONE] with no newline after it, then with a newline but no blank line.
        sse(chunk("Hello") + chunk(" there") + "data: [DONE]"),
        sse(chunk("Again") + "data: [DONE]\n"),
        # Cut off inside an event: a lost connection, not a malformed reply.
        sse(chunk("Partial") + 'data: {"choi'),
        # The error as a bare string, in the stream and as an HTTP error.
        sse('data: {"error": "boom"}\n\n'),
        JSONResponse({"error": "overloaded"}, status_code=503),
    )
    with serve_app(app) as (url, _):
        open_chat(page, url)
        send(page, "one")
        answered(page, "Hello there")
        expect(page.get_by_test_id("status")).to_have_text("Ready.")
        send(page, "two")
        answered(page, "Again")
        answer = page.locator(ASSISTANT).last
        for question, note in [
            ("three", "connection to the server was lost"),
            ("four", "The server failed: boom"),
            ("five", "The server refused the request: overloaded (HTTP 503)"),
        ]:
            send(page, question)
            expect(answer).to_have_attribute("data-state", "error")
            expect(answer.get_by_test_id("message-note")).to_contain_text(note)
        expect(page.locator(ASSISTANT)).to_have_count(5)
        expect(page.locator(ASSISTANT).nth(2)).to_contain_text("Partial")
    assert len(page.errors) == 1 and "503" in page.errors[0]  # the refused request itself


def _get(url: str, path: str) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)  # sent as written: no client-side normalisation of "..".
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def test_page_is_served_only_with_ui_and_only_its_files(chat_model, serve_app):
    server = make_server(chat_model)
    with serve_app(create_app(server)) as (url, _):
        for path in ("/", "/static/chat.js"):
            status, headers, _ = _get(url, path)
            assert status == 404 and "content-security-policy" not in headers
    with serve_app(create_app(make_server(chat_model), ui=True)) as (url, _):
        status, headers, page = _get(url, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in headers["content-security-policy"]
        html = page.decode()
        assert 'src="static/chat.js"' in html and 'src="static/markdown.js"' in html
        # Nothing inline that the CSP would refuse: no style elements or attributes, no inline
        # script or event handler attributes.
        assert not re.search(r"<style|\sstyle=|<script>|\son[a-z]+=", html)
        total = len(page)
        for name in ("chat.js", "markdown.js", "chat.css", "common.css"):
            status, headers, data = _get(url, "/static/" + name)
            assert status == 200 and "content-security-policy" in headers
            total += len(data)
        assert total < 300_000  # the first-load budget, no libraries bundled
        for bad in (
            "/static/../server.py",
            "/static/..%2Fserver.py",
            "/static/%2e%2e%2f__init__.py",
            "/static/.hidden",
            "/static/missing.js",
        ):
            assert _get(url, bad)[0] == 404, bad
        assert (STATIC.parent / "__init__.py").is_file()  # what a traversal would have reached
        status, _, models = _get(url, "/v1/models")
        assert status == 200 and json.loads(models)["data"][0]["id"] == "tiny"
