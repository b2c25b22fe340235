"""An OpenAI-compatible HTTP server (`lmforge serve`): /v1/chat/completions, /v1/completions and
/v1/models, with SSE streaming, over one shared Engine.

The engine runs in a background thread and steps whenever any request is waiting or active, so
requests from many clients decode together in one batch (continuous batching); each HTTP handler
only submits token ids and awaits its text. A client that disconnects cancels its requests, which
frees their engine slots at the next step.

lmforge's own options ride in an extra body field, `"lmforge": {...}` (see `LmforgeOptions` and
docs/serve.md): chain-of-thought, self-consistency, tools and in-context demonstrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.infer import prompting
from lmforge.infer.chat import encode_chat, end_of_turn_ids, with_methods
from lmforge.infer.engine import Engine
from lmforge.infer.engine import Request as EngineRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sequence import Generation
from lmforge.infer.tools import (
    CALCULATOR,
    Tool,
    ToolCall,
    pending_call,
    result_text,
    retrieval_tool,
    run_call,
    tool_instructions,
)
from lmforge.web import add_static

log = logging.getLogger("lmforge.server")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_TOOL_CALLS = 8


# --- Request bodies: unknown fields and wrong types are rejected, naming the field ------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Demo(Strict):
    input: str
    output: str


class LmforgeOptions(Strict):
    """Per-request prompting methods (the `lmforge` body field)."""

    cot: Literal["none", "zeroshot", "fewshot"] = "none"
    self_consistency: int = Field(1, ge=1)
    tools: list[Literal["calculator", "retrieval"]] = []
    demos: list[Demo] = []
    shots: int = Field(4, ge=0, le=32)
    select: Literal["random", "similar", "diverse"] = "similar"
    order: Literal["given", "random", "similar_last"] = "similar_last"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CommonRequest(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    lmforge: LmforgeOptions = LmforgeOptions()


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    logprobs: int | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallBody(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    logprobs: bool | None = None


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = (
            message,
            param,
            status,
            code,
            type,
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def _field(loc: tuple) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- The engine thread --------------------------------------------------------------------------


class EngineWorker:
    """Steps the shared Engine in a background thread while it has work; reports each finished
    request through the callback given at submit time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._on_done: dict[EngineRequest, Callable[[], None]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(
        self,
        ids: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None],
        on_done: Callable[[], None],
    ) -> EngineRequest:
        # Registered under the lock the loop takes to report finished requests, so even a
        # request that finishes in its first step is reported.
        with self._lock:
            request = self.engine.submit(ids, params, on_text)
            self._on_done[request] = on_done
        self._wake.set()
        return request

    def cancel(self, request: EngineRequest) -> None:
        self.engine.cancel(request)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait(0.5)
                continue
            try:
                finished = self.engine.step()
            except Exception:  # a failing step must not kill the server: drop what was running
                log.exception("engine step failed; cancelling its requests")
                with self._lock:
                    for request in self._on_done:
                        self.engine.cancel(request)
                continue
            with self._lock:
                callbacks = [self._on_done.pop(r, None) for r in finished]
            for callback in callbacks:
                if callback is not None:
                    callback()


# --- Generation of one choice: tool rounds, streaming sink ---------------------------------


@dataclasses.dataclass
class Choice:
    text: str
    finish_reason: str
    completion_tokens: int
    calls: list[ToolCall]
    pending: ToolCall | None = None  # a call the client runs (OpenAI `tool_calls`)
    vote: prompting.Vote | None = None  # set on the answer chosen by self-consistency


@dataclasses.dataclass
class Plan:
    """What one HTTP request asks the engine for: the prompt and how to continue it."""

    ids: list[int]
    continuation: str  # text the continuation starts with (CoT trigger, earlier tool results)
    params: SamplingParams
    tools: list[Tool]  # run by the server
    client_tools: list[Tool]  # returned to the client as tool_calls


class Server:
    """The state behind the app: model, tokenizer, engine worker and limits."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str = "lmforge",
        api_key: str | None = None,
        max_batch: int = 8,
        max_context: int | None = None,
        max_n: int = 16,
        default_max_tokens: int = 256,
        docs: str | None = None,
        embed=None,
    ) -> None:
        self.tokenizer, self.name, self.api_key = tokenizer, name, api_key or None
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_context=max_context)
        self.worker = EngineWorker(self.engine)
        self.max_n, self.default_max_tokens = max_n, default_max_tokens
        # A bad folder fails at startup. `embed` (texts -> unit vectors) ranks the retrieval
        # tool's passages and similar demonstrations by embedding similarity instead of BM25.
        self.embed = embed
        self.retrieval = retrieval_tool(docs, embed=embed) if docs else None
        self.chat_stops = end_of_turn_ids(tokenizer)
        self.created = int(time.time())

    # Prompt construction --------------------------------------------------------------------

    def _tools(self, options: LmforgeOptions, declared: list[ToolDef] | None) -> tuple[list, list]:
        server = []
        for name in options.tools:
            if name == "retrieval" and self.retrieval is None:
                raise ApiError(
                    "lmforge.tools: the retrieval tool needs a document folder (serve with --docs)",
                    "lmforge.tools",
                )
            server.append(CALCULATOR if name == "calculator" else self.retrieval)
        known = {t.name: t for t in (CALCULATOR, self.retrieval) if t is not None}
        client = []
        for i, d in enumerate(declared or []):
            if d.function.name not in known:
                raise ApiError(
                    f"unknown tool {d.function.name!r}: this server's models call "
                    f"{', '.join(known)} (see docs/serve.md)",
                    f"tools[{i}].function.name",
                )
            client.append(known[d.function.name])
        return server, client

    def _demos(self, query: str, options: LmforgeOptions, tools: list[Tool]) -> list:
        if options.demos:
            pool = [(d.input, d.output) for d in options.demos]
        elif options.cot == "fewshot":
            pool = prompting.arithmetic_cot_demos(calculator=CALCULATOR in tools)
        else:
            return []
        k = min(options.shots, len(pool))
        # Similarity by the server's sentence embeddings when it has an --embedder, else BM25.
        return prompting.select_demos(
            query, pool, k, method=options.select, order=options.order, seed=0, embed=self.embed
        )

    def _params(self, body: CommonRequest, max_tokens: int | None, prompt_len: int, chat: bool):
        limit = self.engine.max_context
        if body.n > self.max_n:
            raise ApiError(f"n must be at most {self.max_n}, got {body.n}", "n")
        if body.lmforge.self_consistency > self.max_n:
            raise ApiError(
                f"self_consistency must be at most {self.max_n}", "lmforge.self_consistency"
            )
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(
                f"max_tokens must be at most the context length {limit}, got {max_tokens}",
                "max_tokens",
            )
        if prompt_len > limit:
            raise ApiError(
                f"this model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_len}",
                "messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        if body.presence_penalty or body.frequency_penalty:
            which = "presence_penalty" if body.presence_penalty else "frequency_penalty"
            raise ApiError(f"{which} is not supported (only 0)", which)
        if body.logprobs:
            raise ApiError("logprobs are not supported", "logprobs")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ApiError("stop takes up to 4 non-empty strings", "stop")
        return SamplingParams(
            max_new_tokens=max_tokens or self.default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop_strings=tuple(stop),
            stop_token_ids=self.chat_stops if chat else (),
            seed=body.seed,
        )

    def chat_plan(self, body: ChatRequest) -> Plan:
        options = body.lmforge
        tools, client_tools = self._tools(options, body.tools if body.tool_choice != "none" else [])
        messages, continuation = self._continue_tool_calls(body.messages, tools + client_tools)
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        messages, continuation = with_methods(
            messages,
            demos=self._demos(query, options, tools),
            tools=tools + client_tools,
            zero_shot_cot=options.cot == "zeroshot",
            continuation=continuation,
        )
        try:
            ids = encode_chat(self.tokenizer, messages, continuation)
        except LmforgeError as e:
            raise ApiError(str(e), "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self._params(body, max_tokens, len(ids), chat=True)
        return Plan(ids, continuation, params, tools, client_tools)

    def completion_plan(self, body: CompletionRequest, prompt: str) -> Plan:
        options = body.lmforge
        tools, _ = self._tools(options, None)
        continuation = ""
        demos = self._demos(prompt, options, tools)
        # With CoT the prompt is the question, asked in Wei et al.'s "Q: ... A:" format.
        if options.cot == "zeroshot":
            prompt = prompting.cot_query(prompt, zero_shot=True)
        elif options.cot == "fewshot":
            prompt = prompting.cot_query(prompt) + prompting.COT_FORMAT.target_delimiter.rstrip()
        fmt = prompting.COT_FORMAT if options.cot != "none" else prompting.PromptFormat()
        if tools:
            fmt = dataclasses.replace(fmt, description=tool_instructions(tools) + "\n\n")
        text = prompting.build_prompt(prompt, demos, fmt)
        ids = self.tokenizer.encode(text, add_bos=self.tokenizer.adds_bos)
        params = self._params(body, body.max_tokens, len(ids), chat=False)
        return Plan(ids, continuation, params, tools, [])

    def _continue_tool_calls(self, messages: list[Message], tools: list[Tool]):
        """Plain message dicts, and the continuation text when the conversation ends with an
        assistant's tool calls and their results (the client ran them): the assistant turn is
        continued with the calls and results written in the model's call syntax."""
        plain = [
            {"role": m.role if m.role != "developer" else "system", "content": m.text}
            for m in messages
        ]
        end = len(messages)
        while end > 0 and messages[end - 1].role == "tool":
            end -= 1
        if end == len(messages):
            return plain, ""
        caller = messages[end - 1] if end > 0 else None
        if caller is None or caller.role != "assistant" or not caller.tool_calls:
            raise ApiError(
                "tool messages must follow an assistant message with tool_calls",
                f"messages[{end}]",
            )
        results = {m.tool_call_id: m.text for m in messages[end:]}
        by_name = {t.name: t for t in tools}
        text = caller.text
        for i, call in enumerate(caller.tool_calls):
            where = f"messages[{end - 1}].tool_calls[{i}]"
            tool = by_name.get(call.function.name)
            if tool is None:
                raise ApiError(f"unknown tool {call.function.name!r}", f"{where}.function.name")
            try:
                argument = json.loads(call.function.arguments)[tool.argument]
            except (ValueError, KeyError, TypeError):
                raise ApiError(
                    f"arguments must be a JSON object with {tool.argument!r}",
                    f"{where}.function.arguments",
                ) from None
            if call.id not in results:
                raise ApiError(f"no tool message answers tool call {call.id!r}", "messages")
            text += f"{tool.open}{argument}{result_text(tool, results[call.id])}"
        return plain[: end - 1], text

    # Generation -----------------------------------------------------------------------------

    async def _round(self, ids: list[int], params: SamplingParams, sink) -> Generation:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def put(item: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop closed under a late callback
                loop.call_soon_threadsafe(queue.put_nowait, item)

        request = self.worker.submit(ids, params, put, lambda: put(None))
        try:
            while (piece := await queue.get()) is not None:
                if sink is not None:
                    sink(piece)
        finally:
            if not request.finished:
                self.worker.cancel(request)  # the client went away: free the slot
        return request.generation

    async def choice(self, plan: Plan, params: SamplingParams, sink=None) -> Choice:
        """One completion: generate, run each tool call and resume, until no call is pending."""
        text, calls, used = "", [], 0
        tools = plan.tools + plan.client_tools
        stops = tuple(dict.fromkeys((*params.stop_strings, *(t.close for t in tools))))
        reason = "stop"
        for _ in range(MAX_TOOL_CALLS + 1):
            ids = plan.ids + (self.tokenizer.encode(text) if text else [])
            if len(ids) >= self.engine.max_context:
                reason = "length"
                break
            budget = dataclasses.replace(
                params, max_new_tokens=params.max_new_tokens - used, stop_strings=stops
            )
            gen = await self._round(ids, budget, sink)
            text, used, reason = text + gen.text, used + len(gen.tokens), gen.finish_reason
            call = pending_call(text, tools) if tools else None
            if call is None or used >= params.max_new_tokens or len(calls) == MAX_TOOL_CALLS:
                break
            tool, argument = call
            if tool in plan.client_tools and tool not in plan.tools:
                head = text[: text.rfind(tool.open)]
                return Choice(
                    head, "tool_calls", used, calls, ToolCall(tool.name, tool.tag, argument.strip())
                )
            done = await asyncio.to_thread(run_call, tool, argument)
            calls.append(done)
            inserted = result_text(tool, done.result)
            text += inserted
            if sink is not None:
                sink(inserted)
        return Choice(text, reason, used, calls)

    def seeded(self, params: SamplingParams, i: int) -> SamplingParams:
        return params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)


# --- The app ------------------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _tool_calls(call: ToolCall, tool: Tool, index: int) -> list[dict]:
    return [
        {
            "index": index,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": call.name,
                "arguments": json.dumps({tool.argument: call.argument}),
            },
        }
    ]


def create_app(server: Server, ui: bool = False) -> FastAPI:
    """The FastAPI app over `server`; its engine thread runs while the app is up. With `ui`,
    `/` is also a chat page over this same API (lmforge/web, docs/web.md)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(
                f"malformed JSON body: {first.get('ctx', {}).get('error', '')}"
            ).response()
        field = _field(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}"
        else:
            message = f"{field}: {first.get('msg')}"
        return ApiError(message, field or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return ApiError(str(e.detail), status=e.status_code, code=kind).response()

    async def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), server.api_key.encode()):
            raise ApiError(
                "incorrect or missing API key (send Authorization: Bearer KEY)",
                status=401,
                code="invalid_api_key",
            )

    def check_model(name: str) -> None:
        if name != server.name:
            raise ApiError(
                f"the model {name!r} does not exist; this server serves {server.name!r}",
                "model",
                status=404,
                code="model_not_found",
            )

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        card = {
            "id": server.name,
            "object": "model",
            "created": server.created,
            "owned_by": "lmforge",
        }
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorize)])
    async def model_card(name: str):
        check_model(name)
        return {
            "id": server.name,
            "object": "model",
            "created": server.created,
            "owned_by": "lmforge",
        }

    @app.get("/health")
    async def health():
        s = server.engine.stats
        return {"status": "ok", "engine": dataclasses.asdict(s)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, http: Request):
        check_model(body.model)
        plan = server.chat_plan(body)
        return await respond(body, [plan], http, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError("prompt must not be empty", "prompt")
        plans = [server.completion_plan(body, p) for p in prompts]
        return await respond(body, plans, http, chat=False)

    async def respond(body: CommonRequest, plans: list[Plan], http: Request, chat: bool):
        sc = body.lmforge.self_consistency
        if sc > 1 and (body.n > 1 or body.stream):
            raise ApiError(
                "self_consistency gives one voted answer: use it with n=1 and no stream",
                "lmforge.self_consistency",
            )
        if sc > 1 and body.temperature == 0:
            raise ApiError("self_consistency needs temperature > 0", "temperature")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        meta = {"id": rid, "created": created, "model": server.name}
        # Choice index i belongs to plan i // n (OpenAI's order for a list of prompts).
        n = body.n if sc == 1 else sc
        jobs = [(plan, server.seeded(plan.params, k)) for plan in plans for k in range(n)]
        prompt_tokens = sum(len(p.ids) for p in plans)
        if body.stream:
            return StreamingResponse(
                stream(body, jobs, meta, prompt_tokens, chat), media_type="text/event-stream"
            )
        tasks = [asyncio.ensure_future(server.choice(plan, params)) for plan, params in jobs]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.5)
                if not all(t.done() for t in tasks) and await http.is_disconnected():
                    return Response(status_code=499)  # nobody to answer; slots freed below
            results = [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
        used = sum(r.completion_tokens for r in results)
        if sc > 1:
            results = [_voted(results[k : k + sc]) for k in range(0, len(results), sc)]
            jobs = jobs[::sc]
        choices = [_choice_body(i, r, jobs[i][0], chat) for i, r in enumerate(results)]
        kind = "chat.completion" if chat else "text_completion"
        return {**meta, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, used)}

    async def stream(body, jobs, meta, prompt_tokens, chat) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        events: asyncio.Queue = asyncio.Queue()

        def chunk(i: int, delta: dict | None = None, text: str | None = None, finish=None) -> dict:
            c = {"index": i, "finish_reason": finish}
            if chat:
                c["delta"] = delta or {}
            else:
                c.update(text=text or "", logprobs=None)
            return {**meta, "object": kind, "choices": [c]}

        async def run(i: int, plan: Plan, params: SamplingParams) -> None:
            def sink(piece: str) -> None:
                events.put_nowait(chunk(i, {"content": piece}, piece))

            result = await server.choice(plan, params, sink)
            events.put_nowait((i, result))

        tasks = [asyncio.ensure_future(run(i, p, q)) for i, (p, q) in enumerate(jobs)]
        used, open_choices = 0, len(jobs)
        try:
            if chat:
                for i in range(len(jobs)):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}))
            while open_choices:
                event = await events.get()
                if isinstance(event, dict):
                    yield _sse(event)
                    continue
                i, result = event
                open_choices -= 1
                used += result.completion_tokens
                delta = {}
                if result.pending is not None:
                    tool = next(t for t in jobs[i][0].client_tools if t.name == result.pending.name)
                    delta = {"tool_calls": _tool_calls(result.pending, tool, 0)}
                final = chunk(i, delta, "", _finish(result.finish_reason))
                if result.calls:
                    final["choices"][0]["lmforge"] = {
                        "tool_calls": [c.to_dict() for c in result.calls]
                    }
                yield _sse(final)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse(
                    {**meta, "object": kind, "choices": [], "usage": _usage(prompt_tokens, used)}
                )
            yield _sse("[DONE]")
        finally:
            for t in tasks:  # a disconnected client: cancelling frees the engine slots
                t.cancel()

    if ui:
        add_static(app, "chat.html", local_only=server.api_key is None)
    return app


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def _voted(results: list[Choice]) -> Choice:
    """Self-consistency over the samples: the first sample that gives the majority answer,
    with the vote attached (Wang et al. 2023)."""
    v = prompting.vote([r.text for r in results])
    best = next((r for r, a in zip(results, v.answers) if a == v.answer), results[0])
    return dataclasses.replace(best, vote=v)


def _choice_body(i: int, r: Choice, plan: Plan, chat: bool) -> dict:
    out: dict[str, Any] = {"index": i, "finish_reason": _finish(r.finish_reason)}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": r.text}
        if r.pending is not None:
            tool = next(t for t in plan.client_tools if t.name == r.pending.name)
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"}
                for c in _tool_calls(r.pending, tool, 0)
            ]
        out["message"] = message
    else:
        out.update(text=r.text, logprobs=None)
    extra: dict[str, Any] = {}
    if r.calls:
        extra["tool_calls"] = [c.to_dict() for c in r.calls]
    if r.vote is not None:
        v = r.vote
        extra["self_consistency"] = {
            "answer": v.answer,
            "vote_share": v.share,
            "answers": v.answers,
        }
    if extra:
        out["lmforge"] = extra
    return out


def load_embedder(path: str):
    """Sentence embeddings (texts -> unit vectors) of the encoder checkpoint at `path`."""
    from lmforge.adapt.contrastive import Embedder
    from lmforge.loading import load, load_tokenizer

    return Embedder(load(path), load_tokenizer(path))


def serve(
    model_path: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str = "",
    device: str = "cpu",
    ui: bool = False,
    **limits,
) -> None:
    """Load a model and serve it until interrupted. Listening beyond this machine needs an API
    key: an open port would let anyone on the network use (and load) the machine."""
    import uvicorn

    from lmforge.loading import load, load_tokenizer

    if host not in LOCAL_HOSTS and not api_key:
        raise LmforgeError(
            f"refusing to listen on {host} without an API key: pass --api-key (or use "
            "--host 127.0.0.1 for this machine only)"
        )
    model, tokenizer = load(model_path, device=device), load_tokenizer(model_path)
    name = name or model_path.rstrip("/").split("/")[-1].removesuffix(".gguf")
    embedder = limits.pop("embedder", None)
    embed = load_embedder(embedder) if embedder else None
    server = Server(model, tokenizer, name=name, api_key=api_key, embed=embed, **limits)
    print(f"serving {name!r} on http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
    if ui:
        print(f"chat page on http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(server, ui=ui), host=host, port=port, log_level="warning")
