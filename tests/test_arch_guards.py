"""Stages built for the plain causal decoder refuse (or handle) the other architectures instead of
silently computing something else: GGUF export, pipeline stages, tensor-parallel row orders,
prefix tuning; and tokenizers ignore a tokenizer.json's own padding."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.adapt.peft import PeftConfig, PrefixConfig, add_adapter
from lmforge.errors import ConfigError
from lmforge.interop.gguf_export import gguf_architecture
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.pipeline import Stage
from lmforge.train.tensor_parallel import fused_row_orders


def config(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, **kw)


def test_gguf_export_names_what_llama_cpp_cannot_run():
    assert gguf_architecture(config()) == "llama"
    with pytest.raises(ConfigError, match="arch='prefix'"):
        gguf_architecture(config(arch="prefix"))
    with pytest.raises(ConfigError, match="qk_norm=True"):
        gguf_architecture(config(qk_norm=True))


def test_pipeline_stage_refuses_other_architectures():
    Stage(Transformer(config()), 0, 2)  # the plain decoder splits
    with pytest.raises(ConfigError, match="position='alibi'"):
        Stage(Transformer(config(position="alibi")), 0, 2)
    with pytest.raises(ConfigError, match="attention='sliding'"):
        Stage(Transformer(config(attention="sliding", window=8)), 0, 2)


def test_tensor_parallel_splits_every_gated_mlp():
    for mlp in ("swiglu", "geglu"):
        assert "mlp.w_in" in fused_row_orders(config(mlp=mlp, d_ff=64), 2)
    assert "mlp.w_in" not in fused_row_orders(config(mlp="gelu", d_ff=64), 2)


def test_prefix_tuning_with_additive_bias_and_refusal_elsewhere():
    torch.manual_seed(0)
    model = Transformer(config(position="alibi"))
    prefix = PeftConfig(method="prefix", prefix=PrefixConfig(n_tokens=3, init="zero"))
    add_adapter(model, prefix)
    ids = torch.randint(0, 64, (2, 7))
    logits = model(ids)
    assert torch.isfinite(logits).all()
    logits.sum().backward()  # the prefixes get a gradient through the additive-mask path
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ConfigError, match="arch='encoder'"):
        add_adapter(Transformer(config(arch="encoder")), prefix)


def test_tokenizer_json_padding_is_ignored(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Backend(WordLevel({"[PAD]": 0, "[UNK]": 1, "hi": 2, "there": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.enable_padding(pad_id=0, pad_token="[PAD]", length=8)
    backend.enable_truncation(max_length=1)
    backend.save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is not None
    assert Tokenizer.load(tmp_path).encode("hi there") == [2, 3]
