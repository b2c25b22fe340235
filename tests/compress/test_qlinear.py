"""Weight-only quantized layers: kernels vs dequantize-then-matmul; models through the Engine."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.compress.qlinear import QuantizedLinear
from lmforge.compress.quantized_model import quantize_model
from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.layers import Linear


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=128, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


def test_int8_layer_matches_formula_and_kernel():
    torch.manual_seed(0)
    linear = Linear(192, 80, bias=True)
    q = QuantizedLinear.from_linear(linear, 8)
    w = linear.weight.detach()
    S = w.abs().amax(1) / 127  # symmetric, one scale per output channel
    codes = torch.round(w / S[:, None]).clamp(-127, 127)
    assert torch.equal(q.qweight.float(), codes)
    assert torch.allclose(q.dequantized_weight(), codes * S[:, None])
    x = torch.randn(2, 7, 192)
    with torch.no_grad():
        fast = q(x)
        q.use_kernel = False
        reference = q(x)
    assert torch.allclose(reference, F.linear(x, codes * S[:, None], linear.bias), atol=1e-5)
    # The CPU kernel rounds activations to bf16: relative error ~2^-9 per product.
    assert (fast - reference).abs().max() < 2e-2 * reference.abs().max()


def test_int4_layer_matches_formula_and_kernel():
    torch.manual_seed(0)
    linear = Linear(256, 96, bias=False)
    q = QuantizedLinear.from_linear(linear, 4, group_size=64)
    assert q.qweight.shape == (96, 128) and q.qweight.dtype == torch.uint8  # two codes a byte
    w = linear.weight.detach().view(96, 4, 64)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    S = (hi - lo) / 15
    Z = torch.round(lo / S)
    codes = (torch.round(w / S[..., None]) - Z[..., None]).clamp(0, 15)
    assert torch.equal(q.codes().float(), codes.view(96, 256))
    expected_w = ((codes + Z[..., None]) * S[..., None]).view(96, 256)
    assert torch.allclose(q.dequantized_weight(), expected_w, atol=1e-6)
    x = torch.randn(5, 256)
    with torch.no_grad():
        fast = q(x)
        q.use_kernel = False
        reference = q(x)
    assert torch.allclose(reference, x @ expected_w.t(), atol=1e-4)
    assert (fast - reference).abs().max() < 2e-2 * reference.abs().max()


def test_gradients_flow_through_the_fallback():
    q = QuantizedLinear.from_linear(Linear(64, 32), 4, group_size=32)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, q.dequantized_weight().sum(0).expand(3, -1), atol=1e-5)


@pytest.mark.parametrize("bits,group_size,tolerance", [(8, 128, 0.05), (4, 32, 0.5)])
def test_quantized_model_generates_through_the_engine(bits, group_size, tolerance):
    fp = tiny_model()
    model = quantize_model(copy.deepcopy(fp), "rtn", bits, group_size)
    kinds = {
        n: type(m).__name__
        for n, m in model.named_modules()
        if n.endswith(("qkv", "out", "w_in", "w_out", "lm_head"))
    }
    assert set(kinds.values()) == {"QuantizedLinear"} and len(kinds) == 2 * 4 + 1
    assert type(model.embed.weight) is torch.nn.Parameter  # the embedding stays fp32
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        diff = (model(ids) - fp(ids)).abs().max() / fp(ids).abs().max()
    assert diff < tolerance
    # The unchanged Engine (slot KV cache, batching) must agree with a plain greedy loop.
    prompt = [5, 17, 3, 99, 42]
    engine = Engine(model, max_batch=2, max_context=64, prefix_cache_tokens=0)
    [gen] = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert gen.tokens == ids[len(prompt) :]


def test_keep_lm_head_and_tied_embedding():
    model = quantize_model(tiny_model(), "rtn", 8, keep_lm_head=True)
    assert model.lm_head.weight is model.embed.weight
    assert "lm_head" not in model.quantization.layers


def test_errors():
    with pytest.raises(ConfigError, match="does not divide the 128 inputs of blocks.0.attn.qkv"):
        quantize_model(tiny_model(), "rtn", 4, 96)
    with pytest.raises(ConfigError, match="method nf4 supports bits"):
        quantize_model(tiny_model(), "nf4", 8)
    with pytest.raises(ConfigError, match="method must be one of"):
        quantize_model(tiny_model(), "awq", 4)
    with pytest.raises(ConfigError, match="needs calibration"):
        quantize_model(tiny_model(), "gptq", 4, 64)
    model = quantize_model(tiny_model(), "rtn", 8)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model, "rtn", 4, 64)


def test_int4_keeps_one_copy_of_its_codes_and_saves_the_portable_form():
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(Linear(256, 96, bias=True), 4, group_size=64)
    portable = q.qweight.clone()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(3, 256)
    with torch.no_grad():
        fast = q(x)
    if q._kernel_weight is None:
        pytest.skip("no int4 CPU kernel in this PyTorch")
    # After the kernel's repacking only its copy is resident: 0.5 bytes a weight of codes, plus
    # the fp32 scale and zero-point per group and the kernel's bf16 (scale, zero) pairs.
    assert q.qweight is None
    resident = sum(t.numel() * t.element_size() for t in q.buffers()) + sum(
        t.numel() * t.element_size() for t in (q._kernel_weight, q._kernel_scale)
    )
    assert resident == 96 * 256 // 2 + 96 * 4 * (4 + 4 + 2 * 2) + 96 * 4
    # state_dict rebuilds the portable codes bit for bit; loading works in either form.
    saved = q.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)
    assert torch.equal(saved["qweight"], portable)
    other = QuantizedLinear(256, 96, bits=4, group_size=64, bias=True)
    with torch.no_grad():
        other(x)  # kernel form, then overwritten by loading
        other.load_state_dict(saved)
        assert torch.equal(other(x), fast)
        q.use_kernel = False  # the dequantizing path switches back to the portable codes
        assert torch.allclose(q(x), x @ q.dequantized_weight().t() + q.bias, atol=1e-4)
    assert torch.equal(q.qweight, portable) and q._kernel_weight is None


@pytest.mark.parametrize("n,k", [(16, 64), (48, 128), (96, 576), (576, 1536)])
def test_kernel_order_inverts_the_int4_repacking(n, k):
    from lmforge.compress.qlinear import _INT4_KERNEL, _kernel_order

    if not _INT4_KERNEL:
        pytest.skip("no int4 CPU kernel in this PyTorch")
    codes = torch.randint(
        0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n)
    )
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
    back = torch.empty_like(nibbles)
    back[_kernel_order(n, k)] = nibbles
    assert torch.equal(back.view(n, k).int(), codes)
