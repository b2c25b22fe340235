"""LoRA, adapter, prefix and prompt tuning: counts by formula, exact merge, frozen base, saving,
switching and bad input."""

import pytest
import torch

from lmforge.adapt.instruct import Example, SFTData, encode_examples, sft_loss
from lmforge.adapt.peft import (
    BottleneckConfig,
    LoRAConfig,
    PeftConfig,
    PrefixConfig,
    PromptConfig,
    _init_ids,
    add_adapter,
    disabled_adapters,
    load_adapter,
    merge_lora,
    remove_adapter,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unmerge_lora,
)
from lmforge.errors import CheckpointError, ConfigError


def _nonzero_lora(model, cfg):
    adapter = add_adapter(model, PeftConfig(method="lora", lora=cfg))
    with torch.no_grad():
        for layer in adapter.layers.values():
            for p in layer.B.values():
                p.normal_(0, 0.1)
    return adapter


def test_lora_trainable_count_equals_formula(model):
    c = model.config  # d=32, 4 heads x 8, 2 KV heads, ff = round_up(8*32/3) = 128
    q, kv, ff, d, r = 32, 16, c.ff_dim, 32, 4
    add_adapter(model, PeftConfig(method="lora", lora=LoRAConfig(r=r, targets=["all-linear"])))
    per_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ff) + (ff + d))
    assert trainable_parameters(model) == c.n_layers * per_layer
    remove_adapter(model, "default")
    add_adapter(model, PeftConfig(method="lora", lora=LoRAConfig(r=8, targets=["q_proj", "v"])))
    assert trainable_parameters(model) == c.n_layers * 8 * ((d + q) + (d + kv))


@pytest.mark.parametrize(
    ("cfg", "formula"),
    [
        (PeftConfig(method="adapter", adapter=BottleneckConfig(size=4)), 2 * 2 * (2 * 32 * 4 + 4 + 32)),
        (PeftConfig(method="prefix", prefix=PrefixConfig(n_tokens=3, hidden=16)),
         3 * 32 + 32 * 16 + 16 + 16 * (2 * 2 * 2 * 8) + 2 * 2 * 2 * 8),
        (PeftConfig(method="prompt", prompt=PromptConfig(n_tokens=5)), 5 * 32),
    ],
)  # fmt: skip
def test_other_methods_trainable_counts(model, cfg, formula):
    add_adapter(model, cfg)
    assert trainable_parameters(model) == formula


def test_lora_on_q_acts_on_the_q_rows_of_the_fused_weight(model):
    x = torch.randn(1, 5, 32)
    adapter = _nonzero_lora(model, LoRAConfig(r=2, alpha=4, targets=["k"]))
    layer = adapter.layers["blocks/0/attn/qkv"]
    qkv = model.blocks[0].attn.qkv
    with torch.no_grad():
        y = qkv(x)
        with disabled_adapters(model):
            base = qkv(x)
        delta = 2.0 * x @ (layer.B["k"] @ layer.A["k"]).T  # alpha / r = 2
        torch.testing.assert_close(y[..., 32:48], base[..., 32:48] + delta)
        assert torch.equal(y[..., :32], base[..., :32]) and torch.equal(y[..., 48:], base[..., 48:])


def test_lora_merge_unmerge_exact(model):
    x = torch.randint(0, 384, (2, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _nonzero_lora(model, LoRAConfig(r=4, targets=["all-linear"], rslora=True))
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt"])
def test_training_changes_only_the_adapter(model, tokenizer, method):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = add_adapter(model, PeftConfig(method=method), tokenizer=tokenizer)
    start = {k: v.clone() for k, v in adapter.state_dict().items()}
    encoded, _ = encode_examples([Example.from_instance("Say hi.", "hi")] * 4, tokenizer, "ins", 32)
    batch = SFTData(encoded).get_batch(4, 32, seed=0, step=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        sft_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in adapter.state_dict().items())
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if not n.startswith("peft.")
    )


def test_prefix_reparam_dropped_gives_same_outputs(model):
    adapter = add_adapter(model, PeftConfig(method="prefix", prefix=PrefixConfig(n_tokens=4)))
    x = torch.randint(0, 384, (2, 7))
    with torch.no_grad():
        with disabled_adapters(model):
            base = model(x)
        before = model(x)
        adapter.drop_reparam()
        after = model(x)
    assert not hasattr(adapter, "mlp") and adapter.prefix.shape == (2, 2, 2, 4, 8)
    assert (before - base).abs().max() > 1e-4
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_prefix_is_seen_by_every_query(make_model):
    # Reference: the prefix as keys/values computed by hand for layer 0 of a 1-layer model.
    m = make_model(1, n_layers=1)
    adapter = add_adapter(m, PeftConfig(method="prefix", prefix=PrefixConfig(n_tokens=2)))
    adapter.drop_reparam()
    attn, x = m.blocks[0].attn, torch.randn(1, 3, 32)
    rope = m.rope(torch.arange(3)[None])
    with torch.no_grad():
        y = attn(x, rope, None)
        qkv = attn.qkv(x).view(1, 3, 8, 8).transpose(1, 2)
        from lmforge.model.positions import apply_rotary

        qk = apply_rotary(qkv[:, :6], *rope)
        q, k, v = qk[:, :4], qk[:, 4:], qkv[:, 6:]
        k = torch.cat([adapter.prefix[0, 0][None], k], 2).repeat_interleave(2, 1)
        v = torch.cat([adapter.prefix[0, 1][None], v], 2).repeat_interleave(2, 1)
        scores = q @ k.transpose(-1, -2) / 8**0.5
        causal = torch.ones(3, 5, dtype=torch.bool).tril(2)
        ref = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        ref = attn.out(ref.transpose(1, 2).reshape(1, 3, 32))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_prompt_tuning_initialised_from_text(model, tokenizer):
    text = "Answer the question."
    adapter = add_adapter(
        model, PeftConfig(method="prompt", prompt=PromptConfig(n_tokens=6, init_text=text)),
        tokenizer=tokenizer,
    )  # fmt: skip
    ids = (tokenizer.encode(text) * 6)[:6]
    assert torch.equal(adapter.embedding, model.embed.weight[torch.tensor(ids)])
    x = torch.randint(0, 384, (1, 5))
    with torch.no_grad():
        # The soft prompt initialised from text equals putting that text before the input.
        ref = model.__class__.forward(model, torch.cat([torch.tensor([ids]), x], 1))
        out = model(x)
    assert out.shape == (1, 5, 384)
    torch.testing.assert_close(out, ref[:, 6:], atol=1e-5, rtol=0)


def test_adapters_save_load_and_switch(model, make_model, tmp_path):
    x = torch.randint(0, 384, (1, 6))
    _nonzero_lora(model, LoRAConfig(targets=["q", "v"]))
    with torch.no_grad():
        lora_out = model(x)
    save_adapter(model, tmp_path / "lora", base_name="tiny")
    bottleneck = add_adapter(model, PeftConfig(method="adapter"), "bottleneck")
    with torch.no_grad():
        bottleneck.mlp[0].up.weight.normal_()
        adapter_out = model(x)
        set_adapter(model, "default")
        torch.testing.assert_close(model(x), lora_out)
        set_adapter(model, None)
        base_out = model(x)
    assert not torch.allclose(adapter_out, lora_out) and not torch.allclose(base_out, lora_out)
    # A fresh copy of the same base: the saved adapter gives the same outputs.
    fresh = make_model(0)
    load_adapter(fresh, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), lora_out)
    # Another base: an error naming both.
    other = make_model(5)
    with pytest.raises(
        CheckpointError, match=r"trained on base model tiny .* not on this model mine"
    ):
        load_adapter(other, tmp_path / "lora", base_name="mine")


def test_lora_target_matching_nothing_lists_modules(model):
    with pytest.raises(ConfigError, match=r"'q_lin' matches no module.*attn\.q.*mlp\.w_out"):
        add_adapter(model, PeftConfig(method="lora", lora=LoRAConfig(targets=["q_lin"])))


def test_prefix_starts_as_the_base_model_reading_real_tokens(make_model):
    # init="tokens" (the default): the prefixes are the keys/values the base model caches for
    # fixed random tokens, so the adapted model equals the base model continuing from that cache
    # (positions of the input restarting at 0, as under prefix tuning).
    m = make_model(3)
    adapter = add_adapter(m, PeftConfig(method="prefix", prefix=PrefixConfig(n_tokens=3)))
    x = torch.randint(0, 384, (1, 6))
    with torch.no_grad():
        got = m(x)
        with disabled_adapters(m):
            cache = m.new_cache(1)
            m(torch.tensor([_init_ids("", 3, 384, None, "prefix")]), cache=cache)
            ref = m(x, cache=cache, position_ids=torch.arange(6)[None])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert adapter.start.abs().max() > 0.1  # not the near-zero start of init="zero"
    zero = make_model(3)
    add_adapter(zero, PeftConfig(method="prefix", prefix=PrefixConfig(n_tokens=3, init="zero")))
    assert zero.peft.adapters["default"].start.abs().max() == 0


def test_prefix_init_text_needs_the_tokenizer(model, tokenizer):
    cfg = PeftConfig(method="prefix", prefix=PrefixConfig(n_tokens=4, init_text="Answer:"))
    with pytest.raises(ConfigError, match="prefix tuning from init_text needs the model's tok"):
        add_adapter(model, cfg)
    adapter = add_adapter(model, cfg, tokenizer=tokenizer)
    ids = tokenizer.encode("Answer:")
    with torch.no_grad(), disabled_adapters(model):
        cache = model.new_cache(1)
        model(torch.tensor([(ids * 4)[:4]]), cache=cache)
    torch.testing.assert_close(adapter.start[:, 0], cache.k[:, 0, :, :4])


def test_lora_fused_slices_match_per_slice_formula_with_gradients(model):
    # q and v targeted, k (between them) not: one stacked A, block-diagonal B with zero k rows.
    model.train()
    adapter = _nonzero_lora(model, LoRAConfig(r=3, alpha=6, targets=["q", "v"]))
    layer = adapter.layers["blocks/1/attn/qkv"]
    qkv = model.blocks[1].attn.qkv
    x = torch.randn(2, 5, 32, requires_grad=True)
    g = torch.randn(2, 5, 64)
    params = [x, layer.A["q"], layer.B["q"], layer.A["v"], layer.B["v"]]
    got = torch.autograd.grad(qkv(x), params, g)
    base = torch.nn.functional.linear(x, qkv.weight)
    parts = [
        base[..., :32] + 2.0 * x @ layer.A["q"].T @ layer.B["q"].T,
        base[..., 32:48],
        base[..., 48:] + 2.0 * x @ layer.A["v"].T @ layer.B["v"].T,
    ]
    want = torch.autograd.grad(torch.cat(parts, -1), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
