"""Norm placement (pre, post, sandwich, DeepNorm), MLP variants and their widths."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.model.layers import MLP, deepnorm_constants


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def test_deepnorm_constants_match_the_paper():
    # Wang et al. 2022, Table 1 (N encoder / decoder-only layers, M decoder layers).
    ((a, b),) = deepnorm_constants(12).values()
    assert a == pytest.approx((2 * 12) ** 0.25) and b == pytest.approx((8 * 12) ** -0.25)
    ed = deepnorm_constants(6, 18)
    assert ed["encoder_blocks"][0] == pytest.approx(0.81 * (6**4 * 18) ** (1 / 16))
    assert ed["encoder_blocks"][1] == pytest.approx(0.87 * (6**4 * 18) ** (-1 / 16))
    assert ed["blocks"] == pytest.approx(((3 * 18) ** 0.25, (12 * 18) ** -0.25))


def randomize_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("position", ["pre", "post", "sandwich", "deepnorm"])
def test_block_follows_its_norm_equation(position):
    torch.manual_seed(0)
    kw = dict(norm_position="post", deepnorm=True) if position == "deepnorm" else {}
    model = randomize_norms(
        Transformer(tiny(norm="layernorm", bias=True, **(kw or {"norm_position": position})))
    )
    block = model.blocks[0]
    x = torch.randn(2, 7, 64)

    def attn(y):
        return block.attn(y, model.rope(torch.arange(7)[None]), None)

    n1, n2, f = block.attn_norm, block.mlp_norm, block.mlp
    if position == "pre":
        y = x + attn(n1(x))
        want = y + f(n2(y))
    elif position == "post":
        y = n1(x + attn(x))
        want = n2(y + f(y))
    elif position == "sandwich":
        y = x + block.attn_post_norm(attn(n1(x)))
        want = y + block.mlp_post_norm(f(n2(y)))
    else:
        alpha = (2 * 2) ** 0.25
        y = n1(alpha * x + attn(x))
        want = n2(alpha * y + f(y))
    got = block(x, model.rope(torch.arange(7)[None]), None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_deepnorm_init_scales_value_output_and_ffn_by_beta():
    torch.manual_seed(0)
    c = ModelConfig(
        vocab_size=64,
        d_model=256,
        n_layers=8,
        n_heads=4,
        norm_position="post",
        deepnorm=True,
        mlp="gelu",
    )
    m = Transformer(c)
    beta = (8 * 8) ** -0.25
    qkv = m.blocks[0].attn.qkv.weight
    assert abs(qkv[:512].std().item() - 0.02) < 2e-3  # queries and keys: unscaled
    assert abs(qkv[512:].std().item() - 0.02 * beta) < 1e-3  # values
    for w in (
        m.blocks[3].attn.out.weight,
        m.blocks[3].mlp.w_in.weight,
        m.blocks[3].mlp.w_out.weight,
    ):
        assert abs(w.std().item() - 0.02 * beta) < 1e-3


def test_post_norm_has_no_final_norm_by_default_and_embed_norm_applies():
    assert isinstance(Transformer(tiny(norm_position="post")).norm, torch.nn.Identity)
    assert not isinstance(
        Transformer(tiny(norm_position="post", final_norm=True)).norm, torch.nn.Identity
    )
    m = Transformer(tiny(embed_norm=True, norm="layernorm", position="none")).eval()
    x = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(m._embed(x, None, None), m.embed_norm(m.embed(x)))


@pytest.mark.parametrize(
    "kind,act,gated",
    [
        ("relu", F.relu, False),
        ("gelu", F.gelu, False),
        ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh"), False),
        ("swiglu", F.silu, True),
        ("geglu", F.gelu, True),
        ("geglu_tanh", lambda h: F.gelu(h, approximate="tanh"), True),
    ],
)
def test_mlp_variants(kind, act, gated):
    torch.manual_seed(0)
    mlp = MLP(tiny(mlp=kind, bias=True))
    x = torch.randn(3, 64)
    h = x @ mlp.w_in.weight.T + mlp.w_in.bias
    if gated:  # Shazeer 2020: act(x W) * (x V)
        gate, up = h.chunk(2, -1)
        h = act(gate) * up
    else:
        h = act(h)
    torch.testing.assert_close(mlp(x), h @ mlp.w_out.weight.T + mlp.w_out.bias)


def test_gated_width_rule_is_selectable():
    assert tiny(mlp="geglu").ff_dim == 192  # 2/3 * 256 = 170.7, rounded up to 64
    assert tiny(mlp="geglu", ff_two_thirds=False).ff_dim == 256
    assert tiny(mlp="relu").ff_dim == 256
    assert tiny(mlp="swiglu", d_ff=100).ff_dim == 100


def test_qk_norm_and_softcaps():
    torch.manual_seed(0)
    m = Transformer(tiny(qk_norm=True, attn_softcap=5.0, logit_softcap=2.0)).eval()
    x = torch.randint(0, 97, (2, 9))
    logits = m(x)
    assert logits.abs().max() < 2.0
    with torch.no_grad():
        m.lm_head.weight.mul_(100)  # huge raw logits stay within the cap
    assert m(x).abs().max() <= 2.0
    attn = m.blocks[0].attn
    assert attn.q_norm.weight.shape == (16,)
    # Soft-capped attention against the formula written out.
    h = torch.randn(1, 6, 64)
    q, k, v = (t.view(1, 6, 4, 16).transpose(1, 2) for t in attn.qkv(h).split(64, -1))
    q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = m.rope(torch.arange(6)[None])
    from lmforge.model.positions import apply_rotary

    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    s = 5.0 * torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(16) / 5.0)
    s = s.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    ref = attn.out((s.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 64))
    torch.testing.assert_close(attn(h, (cos, sin), None), ref, atol=1e-5, rtol=1e-5)
