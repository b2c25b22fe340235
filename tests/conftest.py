"""Fixtures shared by test folders: the tiny chat model the server and web page tests serve, a
client that walks away from a request, and FIFOs that cannot hang a test."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import pytest
import torch


class Slowed(torch.nn.Module):
    """A model with an adjustable pause before each forward pass, so that a test can act while
    an answer is still being generated (stop it, cut the connection)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.config, self.delay = inner, inner.config, 0.0

    def forward(self, *args, **kwargs):
        if self.delay:
            time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="session")
def chat_model():
    """(Slowed tiny random-weight model, its BPE tokenizer) for the server and chat page tests;
    a test that sets `delay` sets it back."""
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import train_bpe

    tokenizer = train_bpe(
        ["hello world, how are you today? fine thanks."] * 30, 300, min_frequency=1
    )
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_seq_len=256,
        init_std=0.3,
    )
    return Slowed(Transformer(config).eval()), tokenizer


def _abandon(server, port: int, headers: str = "") -> None:
    """Send a plain (non-streamed) completion request for 100 tokens to the server on `port`,
    close the connection once the engine has started on it, and wait until the engine is idle
    again (or 5 s). The model is slowed meanwhile, so the request cannot finish first."""
    engine = server.engine
    body = json.dumps({"model": server.name, "prompt": "hello", "max_tokens": 100}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    engine.model.delay = 0.02
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head + body)
            deadline = time.time() + 5
            while not engine.has_work() and time.time() < deadline:
                time.sleep(0.01)
        deadline = time.time() + 5
        while engine.has_work() and time.time() < deadline:
            time.sleep(0.02)
    finally:
        engine.model.delay = 0.0


@pytest.fixture(scope="session")
def abandon_request():
    """`abandon_request(server, port, headers="")`: a client that disconnects mid-request."""
    return _abandon


@contextlib.contextmanager
def _fifos(*paths):
    """FIFOs at `paths`. On the way out any reader still waiting on one is let go: opening the
    write end and closing it gives it end-of-file, so a failing test cannot hang the session."""
    for path in paths:
        os.mkfifo(path)
    try:
        yield
    finally:
        for path in paths:
            with contextlib.suppress(OSError):  # ENXIO: no reader, nothing to let go
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.fixture(scope="session")
def fifos():
    """`with fifos(*paths):` named pipes in the place of files, released on the way out."""
    return _fifos
