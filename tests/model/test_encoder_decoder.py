"""Encoder-decoder (T5-style): causal decoder over a bidirectional encoder, cached decoding."""

import torch

from lmforge.model import ModelConfig, Transformer

T5_LIKE = ModelConfig(
    vocab_size=97,
    d_model=64,
    n_layers=2,
    n_decoder_layers=3,
    n_heads=4,
    max_seq_len=64,
    arch="encoder_decoder",
    position="t5_bias",
    mlp="relu",
    attn_scale=1.0,
)


def model():
    torch.manual_seed(0)
    return Transformer(T5_LIKE).eval()


def test_decoder_is_causal_and_reads_the_whole_encoder_input():
    m = model()
    src, tgt = torch.randint(0, 97, (2, 11)), torch.randint(0, 97, (2, 7))
    out = m(src, decoder_input_ids=tgt)
    assert out.shape == (2, 7, 97) and len(m.encoder_blocks) == 2 and len(m.blocks) == 3
    tgt2 = tgt.clone()
    tgt2[:, 5] = (tgt2[:, 5] + 1) % 97
    torch.testing.assert_close(m(src, decoder_input_ids=tgt2)[:, :5], out[:, :5])
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 97
    assert not torch.allclose(m(src2, decoder_input_ids=tgt)[:, 0], out[:, 0])


def test_encoder_padding_is_ignored():
    m = model()
    src = torch.randint(0, 97, (1, 6))
    padded = torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    tgt = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(
        m(padded, attention_mask=mask, decoder_input_ids=tgt),
        m(src, decoder_input_ids=tgt),
        atol=1e-5,
        rtol=1e-5,
    )


def test_cached_decoding_matches_full_forward_and_encodes_memory_once():
    m = model()
    src, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 8))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    full = m(src, attention_mask=mask, decoder_input_ids=tgt)
    calls = []
    for block in m.blocks:
        block.cross_attn.kv.register_forward_hook(lambda *a: calls.append(1))
    memory = m.encode(src, attention_mask=mask)
    cache = m.new_cache(2)
    steps = [
        m(
            None,
            memory=memory,
            attention_mask=mask,
            decoder_input_ids=tgt[:, i : i + 1],
            cache=cache,
        )
        for i in range(8)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(m.blocks)  # cross-attention keys/values once per layer
    assert cache.length == 8 and cache.k.shape[0] == 3


def test_tied_output_scale_and_backward():
    c = ModelConfig(**{**T5_LIKE.__dict__, "output_scale": 64**-0.5, "position": "rope"})
    torch.manual_seed(0)
    m = Transformer(c)
    src, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 8))
    logits, h = m(src, decoder_input_ids=tgt, return_hidden=True)
    torch.testing.assert_close(logits, (h * 64**-0.5) @ m.embed.weight.T)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_checkpoint_round_trip_of_every_arch(tmp_path):
    import lmforge
    from lmforge.train.checkpoint import save_model

    configs = {
        "t5": T5_LIKE,
        "bert": ModelConfig(
            vocab_size=97,
            d_model=32,
            n_layers=1,
            n_heads=2,
            arch="encoder",
            norm_position="post",
            position="learned",
            embed_norm=True,
            type_vocab_size=2,
            nsp_head=True,
            bias=True,
        ),
        "deep_prefix": ModelConfig(
            vocab_size=97,
            d_model=32,
            n_layers=2,
            n_heads=2,
            arch="prefix",
            norm_position="post",
            deepnorm=True,
            rope_fraction=0.5,
            attention="sliding",
            window=4,
        ),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        m = Transformer(config).eval()
        save_model(m, tmp_path / name)
        back = lmforge.load(tmp_path / name)
        x = torch.randint(0, 97, (1, 8))
        kw = {"decoder_input_ids": x[:, :5]} if name == "t5" else {}
        torch.testing.assert_close(back(x, **kw), m(x, **kw))
