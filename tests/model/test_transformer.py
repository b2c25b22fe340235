import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


VARIANTS = {
    "llama_gqa": tiny(n_kv_heads=2),
    "mqa": tiny(n_kv_heads=1),
    "gpt2": tiny(norm="layernorm", mlp="gelu_tanh", position="learned", bias=True),
    "untied_qkv_bias": tiny(tie_embeddings=False, qkv_bias=True, mlp="gelu"),
}


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def model(request):
    torch.manual_seed(0)
    return Transformer(VARIANTS[request.param]).eval()


def test_logits_shape_and_hidden(model):
    x = torch.randint(0, 97, (3, 11))
    logits, hidden = model(x, return_hidden=True)
    assert logits.shape == (3, 11, 97) and hidden.shape == (3, 11, 64)
    assert torch.allclose(model(x, logits_to_keep=1), logits[:, -1:], atol=1e-6)


def test_causality(model):
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    assert torch.allclose(model(x)[:, :8], model(y)[:, :8], atol=1e-6)
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:], atol=1e-3)


def test_kv_cache_matches_full_recompute(model):
    x = torch.randint(0, 97, (2, 20))
    full = model(x)
    cache = model.new_cache(2)
    chunks = [model(x[:, :7], cache=cache), model(x[:, 7:13], cache=cache)]
    chunks += [model(x[:, i : i + 1], cache=cache) for i in range(13, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded(model):
    a = torch.randint(0, 97, (1, 9))
    b = torch.randint(0, 97, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model(batch, attention_mask=mask)
    torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:], model(b)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_attention_matches_explicit_softmax():
    """One layer's attention against softmax(QK^T/sqrt(d) + causal) V written out."""
    torch.manual_seed(0)
    m = Transformer(tiny(n_kv_heads=2, n_layers=1, position="learned")).eval()
    attn = m.blocks[0].attn
    x = torch.randn(2, 10, 64)
    q, k, v = attn.qkv(x).split([64, 32, 32], dim=-1)
    q = q.view(2, 10, 4, 16).transpose(1, 2)
    k = k.view(2, 10, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    v = v.view(2, 10, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    ref = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 10, 64)
    torch.testing.assert_close(attn(x, None, None), attn.out(ref), atol=1e-5, rtol=1e-5)


def test_rope_rotation_is_relative():
    """RoPE: q.k depends only on the distance between positions."""
    from lmforge.model.positions import RotaryEmbedding, apply_rotary

    rope = RotaryEmbedding(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(i, j):
        qi = apply_rotary(q, *rope(torch.tensor([[i]])))
        kj = apply_rotary(k, *rope(torch.tensor([[j]])))
        return (qi * kj).sum()

    assert torch.allclose(dot(5, 2), dot(40, 37), atol=1e-4)
    assert not torch.allclose(dot(5, 2), dot(5, 4), atol=1e-3)


def test_parameter_count_and_flops_formula():
    c = tiny(n_kv_heads=2, tie_embeddings=False)
    m = Transformer(c)
    d, f, L, V = 64, c.ff_dim, 2, 97
    per_layer = d * (d + 2 * 32) + d * d + 2 * d * f + f * d + 2 * d  # qkv, out, mlp, 2 norms
    assert m.num_params() == V * d + L * per_layer + d + V * d
    assert m.num_params(non_embedding=True) == m.num_params() - V * d
    matmul = L * (d * (d + 2 * 32) + d * d + 3 * d * f) + V * d
    assert m.flops_per_token(32) == 6 * matmul + 12 * L * 4 * 16 * 32
    assert c.ff_dim == 192  # 2/3 * 4 * 64 = 170.7, rounded up to a multiple of 64


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4))
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 2e-3
    expected = 0.02 / math.sqrt(16)
    assert abs(m.blocks[3].mlp.w_out.weight.std().item() - expected) < 1e-3
    assert m.lm_head.weight is m.embed.weight


def test_too_long_sequence_errors(model):
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
