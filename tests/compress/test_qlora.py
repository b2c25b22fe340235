"""QLoRA: LoRA over a frozen NF4 base, against LoRA over the dequantized base in fp32."""

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmforge.adapt.peft import LoRAConfig, PeftConfig, add_adapter, merge_lora
from lmforge.compress import nf4
from lmforge.compress.nf4 import NF4Linear
from lmforge.compress.qlora import prepare_qlora
from lmforge.compress.quantized_model import load_quantized, quantize_model, save_quantized
from lmforge.errors import ConfigError, LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.layers import Linear
from lmforge.train.objectives import causal_lm_loss

LORA = LoRAConfig(r=4, alpha=8.0, targets=["all-linear"])


def tiny(bias: bool = False) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=96, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, bias=bias
    )
    return Transformer(config)


def batch(vocab: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def test_nf4_product_and_input_gradient_match_f_linear(monkeypatch):
    # Several row chunks (2^10 weights: 8 rows of 128) and a bias.
    monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 1 << 10)
    torch.manual_seed(0)
    linear = Linear(128, 40, bias=True)
    layer = NF4Linear.from_linear(linear)
    w = layer.dequantized_weight()
    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 40)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w, layer.bias)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


def test_only_lora_trains_and_the_nf4_base_stays_bit_identical():
    model = tiny().train()
    prepare_qlora(model, LORA)
    assert all(isinstance(m, NF4Linear) for n, m in model.named_modules()
               if n.startswith("blocks.") and n.endswith("qkv"))  # fmt: skip
    assert not isinstance(model.lm_head, NF4Linear)  # fp32, as in the paper
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("peft.adapters.default.") for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = batch()
    losses = []
    for _ in range(25):
        loss = causal_lm_loss(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # codes, scales, fp32 rest
    assert losses[-1] < 0.8 * losses[0]


def test_lora_gradients_match_lora_over_the_dequantized_fp32_base():
    fp32 = tiny(bias=True)
    model = copy.deepcopy(fp32)
    adapter = prepare_qlora(model, LORA)
    with torch.no_grad():  # B != 0, so every layer's LoRA path carries gradient to the next
        for b in adapter.layers.values():
            for p in b.B.values():
                p.normal_(0, 0.05)
    # The reference: plain fp32 Linears holding the NF4 weights dequantized, the same LoRA.
    ref = copy.deepcopy(fp32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):
                ref.get_submodule(name).weight.copy_(module.dequantized_weight())
    ref_adapter = add_adapter(ref, PeftConfig(method="lora", lora=LORA))
    ref_adapter.load_state_dict(adapter.state_dict())
    x, y = batch()
    loss, ref_loss = causal_lm_loss(model, (x, y)), causal_lm_loss(ref, (x, y))
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grads = dict(adapter.named_parameters())
    for name, p in ref_adapter.named_parameters():
        assert grads[name].grad.abs().sum() > 0
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_no_fp32_copy_of_a_base_weight_is_kept_for_backward():
    model = tiny().train()
    prepare_qlora(model, LORA)
    sizes = {m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        causal_lm_loss(model, batch())
    assert saved and not any(t.numel() in sizes and t.dim() == 2 for t in saved)


def test_from_an_nf4_checkpoint_and_bad_bases(tmp_path):
    model = quantize_model(tiny(), "nf4", 4, keep_lm_head=True)
    save_quantized(model, tmp_path / "nf4")
    loaded = load_quantized(tmp_path / "nf4").train()
    adapter = prepare_qlora(loaded, LORA)
    assert len(adapter.layers) == 2 * 4  # qkv, out, w_in, w_out in each of 2 blocks
    codes = {k: v.clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(LmforgeError, match="cannot merge LoRA into a quantized base layer"):
        merge_lora(loaded)  # refused up front, nothing changed
    assert all(torch.equal(v, codes[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ConfigError, match="NF4 base with an fp32 output layer"):
        prepare_qlora(quantize_model(tiny(), "rtn", 8), LORA)
    with pytest.raises(ConfigError, match="including its output layer"):
        prepare_qlora(quantize_model(tiny(), "nf4", 4), LORA)


def test_adapter_and_nf4_base_save_and_load(tmp_path):
    from lmforge.adapt.peft import load_adapter, save_adapter

    model = tiny()
    adapter = prepare_qlora(model, LORA)
    with torch.no_grad():
        for layer in adapter.layers.values():
            for p in layer.B.values():
                p.normal_(0, 0.05)
    save_quantized(model, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter")
    meta = yaml.safe_load((tmp_path / "adapter" / "adapter.yaml").read_text())
    assert meta["base_model"]["quantization"]["method"] == "nf4"  # the base it needs
    loaded = load_quantized(tmp_path / "base")
    load_adapter(loaded, tmp_path / "adapter")  # checks the NF4 base's fingerprint
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
