"""Shared fixtures: a tiny Llama-style model and a small BPE tokenizer with ChatML tokens."""

import pytest
import torch

from lmforge.data.synthetic import generate
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
        mlp="swiglu", position="rope", norm="rmsnorm",
    )  # fmt: skip
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


@pytest.fixture(scope="session")
def tokenizer():
    texts = [it.question + " " + it.solution for t in ("arithmetic", "sorting", "comparison")
             for it in generate(t, 40, split="train")]  # fmt: skip
    return train_bpe(texts * 3, 380)


@pytest.fixture
def make_model():
    """A factory: make_model(seed, **config overrides) -> a tiny Transformer in eval mode."""

    def make(seed: int = 0, **overrides) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(tiny_config(**overrides)).eval()

    return make


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core machine extra threads only contend (10-50x).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
