"""Prefix decoder and encoder-only (BERT-style) models, every arch's forward/backward, and config
combinations that must fail at load naming both fields."""

import pytest
import torch

from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import pattern_mask


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


BERT = dict(
    arch="encoder",
    norm="layernorm",
    norm_position="post",
    position="learned",
    mlp="gelu",
    bias=True,
    embed_norm=True,
    type_vocab_size=2,
    nsp_head=True,
)


def test_prefix_mask_is_bidirectional_over_the_prefix_then_causal():
    prefix_len = torch.tensor([3, 0, 6])
    mask = pattern_mask(
        tiny(arch="prefix"), torch.arange(6)[None], 6, causal=True, prefix_len=prefix_len
    )[:, 0]
    for b, P in enumerate(prefix_len.tolist()):
        for i in range(6):
            for j in range(6):
                assert mask[b, i, j].item() == (j <= i or (i < P and j < P)), (b, i, j)


def test_prefix_decoder_prefix_sees_ahead_targets_stay_causal():
    torch.manual_seed(0)
    model = Transformer(tiny(arch="prefix")).eval()
    x = torch.randint(0, 97, (1, 12))
    P = torch.tensor([5])
    y = x.clone()
    y[0, 4] = (y[0, 4] + 1) % 97  # last prefix token
    out_x, out_y = model(x, prefix_len=P), model(y, prefix_len=P)
    assert not torch.allclose(out_x[:, 0], out_y[:, 0])  # the prefix's first token sees it
    z = x.clone()
    z[0, 9] = (z[0, 9] + 1) % 97  # a target token: nothing before it changes
    torch.testing.assert_close(model(z, prefix_len=P)[:, :9], out_x[:, :9])
    # Without a prefix the model is a causal decoder.
    torch.testing.assert_close(model(x), model(x, prefix_len=torch.tensor([0])), atol=1e-5, rtol=0)


def test_prefix_decoder_generates_with_a_cache():
    torch.manual_seed(0)
    model = Transformer(tiny(arch="prefix")).eval()
    x = torch.randint(0, 97, (2, 14))
    P = torch.tensor([6, 6])
    full = model(x, prefix_len=P)
    cache = model.new_cache(2)
    steps = [model(x[:, :6], prefix_len=P, cache=cache)]
    steps += [model(x[:, i : i + 1], cache=cache) for i in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_encoder_is_bidirectional_and_has_mlm_and_nsp_heads():
    torch.manual_seed(0)
    model = Transformer(tiny(**BERT)).eval()
    x = torch.randint(0, 97, (2, 10))
    types = torch.tensor([[0] * 5 + [1] * 5] * 2)
    logits, hidden = model(x, token_type_ids=types, return_hidden=True)
    assert logits.shape == (2, 10, 97) and hidden.shape == (2, 10, 64)
    assert model.nsp_logits(hidden).shape == (2, 2)
    # MLM logits: dense + act + LayerNorm, then the tied output layer with its bias.
    t = model.mlm_transform
    ref = (
        t.norm(torch.nn.functional.gelu(t.dense(hidden))) @ model.embed.weight.T
        + model.lm_head.bias
    )
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 97
    assert not torch.allclose(model(y, token_type_ids=types)[0, 0], logits[0, 0])  # sees ahead
    assert not torch.allclose(model(x)[0], logits[0])  # token types matter
    torch.testing.assert_close(model.encode(x, token_type_ids=types), hidden)


def test_encoder_padding_is_ignored():
    torch.manual_seed(0)
    model = Transformer(tiny(**BERT)).eval()
    a = torch.randint(0, 97, (1, 6))
    batch = torch.cat(
        [torch.cat([a, torch.zeros(1, 3, dtype=torch.long)], 1), torch.randint(0, 97, (1, 9))]
    )
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    torch.testing.assert_close(
        model(batch, attention_mask=mask)[0, :6], model(a)[0], atol=1e-5, rtol=1e-5
    )


ARCHS = {
    "causal": tiny(),
    "prefix": tiny(arch="prefix", position="alibi"),
    "encoder": tiny(**BERT),
    "encoder_decoder": tiny(
        arch="encoder_decoder", position="t5_bias", mlp="relu", n_decoder_layers=1
    ),
    "sandwich_sparse": tiny(norm_position="sandwich", attention="block_sparse", sparse_block=4),
    "deepnorm_encdec": tiny(
        arch="encoder_decoder", norm_position="post", deepnorm=True, position="sinusoidal"
    ),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_runs_forward_and_backward(arch):
    torch.manual_seed(0)
    model = Transformer(ARCHS[arch])
    x = torch.randint(0, 97, (2, 10))
    if ARCHS[arch].arch == "encoder_decoder":
        logits = model(x, decoder_input_ids=x[:, :6])
        assert logits.shape == (2, 6, 97)
    elif arch == "prefix":
        logits = model(x, prefix_len=torch.tensor([4, 7]))
    else:
        logits = model(x)
    loss = logits.logsumexp(-1).mean()
    if arch == "encoder":
        _, hidden = model(x, return_hidden=True)
        loss = loss + model.nsp_logits(hidden).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


BAD = [
    (dict(arch="encoder_decoder", position="alibi"), ("position", "arch")),
    (dict(nsp_head=True), ("nsp_head", "arch")),
    (dict(attention="sliding", window=65), ("window", "max_seq_len")),
    (dict(n_kv_heads=3), ("n_heads", "n_kv_heads")),
    (dict(deepnorm=True), ("deepnorm", "norm_position")),
    (dict(type_vocab_size=2), ("type_vocab_size", "arch")),
    (dict(attention="block_sparse", sparse_block=128), ("sparse_block", "max_seq_len")),
]


@pytest.mark.parametrize("kw,fields", BAD, ids=[f[0] for _, f in BAD])
def test_bad_combinations_fail_at_load_naming_both_fields(kw, fields):
    data = {**dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64), **kw}
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, data)
    assert all(f in str(e.value) for f in fields), str(e.value)


def test_unknown_arch_names_the_field():
    with pytest.raises(ConfigError, match="arch"):
        from_dict(ModelConfig, {"arch": "decoder"})
