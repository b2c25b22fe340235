"""Serving throughput and latency: `lmforge serve` (continuous batching) against a minimal FastAPI
wrapper around transformers' plain `generate` (one request at a time, as `generate` has no way to
add a request to a running batch), both on SmolLM2-135M-Instruct with the same weights (the GGUF
converted to a Hugging Face directory), the same chat prompts and the same OpenAI streaming API.

For 1, 4 and 16 concurrent streaming clients (the official `openai` client, one thread each), it
reports sustained requests/s, p50/p99 request latency, p50 time to first token and generated
tokens/s. Run: `python benchmarks/serve.py [--threads 2] [--max-tokens 32]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for sleeping well.",
    "Name three colours of the rainbow.",
    "How many times did I go to the coffee shop if I went in once and came out once?",
    "What is 12 times 7?",
    "Write a short greeting for a friend.",
    "Why is the sky blue?",
    "What does a baker do?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- The peer: transformers' generate behind the same API shape -------------------------------


def hf_server(model_dir: str, port: int, threads: int) -> None:
    """/v1/models and streaming /v1/chat/completions over transformers' generate, serialized."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM

    from lmforge.infer.chat import encode_chat, end_of_turn_ids
    from lmforge.infer.sequence import Detokenizer
    from lmforge.loading import load_tokenizer

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer("smollm2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stops = list(end_of_turn_ids(tokenizer))
    lock = threading.Lock()  # generate() runs one request at a time
    app = FastAPI()

    class Streamer:  # transformers' BaseStreamer interface: put(ids) per step, then end()
        # Tokens go straight onto the request's asyncio queue: no executor thread waits per
        # request, so queued requests cannot starve the running one of threads.
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop, self.q = loop, asyncio.Queue()
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for t in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.q.put_nowait, t)

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.q.put_nowait, None)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "smollm2", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        ids = encode_chat(tokenizer, body["messages"])
        streamer = Streamer(asyncio.get_running_loop())

        def run() -> None:
            with lock, torch.inference_mode():
                model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=body.get("max_tokens", 32),
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=stops[0],
                    streamer=streamer,
                )

        threading.Thread(target=run, daemon=True).start()

        async def events():
            detok = Detokenizer(tokenizer)
            meta = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "smollm2"}
            while (token := await streamer.q.get()) is not None:
                if token in stops:
                    continue
                if piece := detok.push(token):
                    delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                    yield f"data: {json.dumps({**meta, 'choices': [delta]})}\n\n"
            end = {"index": 0, "delta": {}, "finish_reason": "stop"}
            yield f"data: {json.dumps({**meta, 'choices': [end]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- Load generation ----------------------------------------------------------------------------


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/models", timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError("server did not start")


def load_test(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` streaming chat requests spread over `clients` threads; latency per request."""
    import openai

    latencies, first_token, tokens = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        api = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
        for i in counter:
            question = QUESTIONS[i % len(QUESTIONS)]
            start = time.perf_counter()
            first, pieces = None, 0
            stream = api.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces += 1
            with lock:
                latencies.append(time.perf_counter() - start)
                first_token.append((first or time.perf_counter()) - start)
                tokens.append(pieces)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "req_per_s": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "ttft_p50": statistics.median(first_token),
        "tokens_per_s": sum(tokens) / wall,
    }


def run_server(cmd: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}/v1"
    wait_ready(base, proc)
    return proc, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--hf-dir", default="/tmp/lmforge_bench/smollm2_hf")
    ap.add_argument("--hf-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--servers", default="lmforge,hf", help="which of lmforge,hf to measure")
    args = ap.parse_args()
    if args.hf_server:
        hf_server(args.hf_dir, args.port, args.threads)
        return
    if "hf" in args.servers and not (Path(args.hf_dir) / "config.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lmforge",
                "convert",
                "--src",
                "smollm2",
                "--dst",
                args.hf_dir,
                "--to",
                "hf",
            ],
            check=True,
        )
    servers = {
        "lmforge serve (continuous batching, max_batch 16)": [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            "--model",
            "smollm2",
            "--max_batch",
            "16",
        ],
        "transformers generate (FastAPI wrapper, serialized)": [
            sys.executable,
            __file__,
            "--hf-server",
            "--hf-dir",
            args.hf_dir,
            "--threads",
            str(args.threads),
        ],
    }
    keys = dict(zip(("lmforge", "hf"), servers))
    rows = []
    for name, cmd in servers.items():
        if not any(keys[k] == name for k in args.servers.split(",")):
            continue
        proc, base = run_server(cmd, args.threads)
        try:
            load_test(base, 1, 1, args.max_tokens)  # warm-up
            for clients in map(int, args.clients.split(",")):
                requests = max(4, 2 * clients)  # a steady load: each client sends several
                r = load_test(base, clients, requests, args.max_tokens)
                rows.append((name, r))
                print(name, json.dumps(r), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nmax_tokens {args.max_tokens}, greedy, {args.threads} threads\n")
    print(
        "| server | clients | requests | req/s | p50 latency (s) | p99 latency (s) | "
        "p50 first token (s) | tokens/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['p50']:.2f} "
            f"| {r['p99']:.2f} | {r['ttft_p50']:.2f} | {r['tokens_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
