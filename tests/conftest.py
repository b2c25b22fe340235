"""Fixtures shared by test folders: the tiny chat model the server and web page tests serve."""

from __future__ import annotations

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
