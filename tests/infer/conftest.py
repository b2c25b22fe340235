"""The tiny random models the generation and engine tests decode with, in two families."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import ModelConfig, Transformer

VARIANTS = {
    "llama": {},
    "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu_tanh", "bias": True},
}


def tiny_model(variant: str = "llama") -> Transformer:
    # init_std 0.3 (not 0.02) so a random model does not just repeat one token forever.
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=97,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        init_std=0.3,
        **VARIANTS[variant],
    )
    return Transformer(config).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request: pytest.FixtureRequest) -> Transformer:
    return tiny_model(request.param)
