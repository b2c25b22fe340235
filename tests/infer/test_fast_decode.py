"""The C++ decode step (lmforge/infer/fast_decode.py) against the Python model it replaces."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.compress.quantized_model import quantize_model
from lmforge.infer import fast_decode
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import SlotKVCache

LLAMA = dict(
    vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, mlp="swiglu"
)
GPT2 = dict(
    vocab_size=96,
    d_model=48,
    n_layers=2,
    n_heads=3,
    n_kv_heads=3,
    max_seq_len=64,
    mlp="gelu_tanh",
    position="learned",
    norm="layernorm",
    bias=True,
)


@pytest.fixture(scope="module")
def ext():
    module = fast_decode.extension()
    if module is None:
        pytest.skip(f"the C++ decode step cannot be built here: {fast_decode._build_error}")
    return module


def model_of(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**LLAMA, "init_std": 0.2, **overrides})).eval()


def step_both(model, decoder, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill each slot with `lengths[s]` random tokens in two identical caches, then decode one
    token for all slots: (Python model logits, C++ step logits); the caches must agree too."""
    caches = [SlotKVCache(model.config, len(lengths), 64) for _ in range(2)]
    with torch.inference_mode():
        for slot, n in enumerate(lengths):
            ids = torch.randint(0, model.config.vocab_size, (1, n))
            for cache in caches:
                model(ids, cache=cache.batch(slot, slot + 1))
        tokens = torch.randint(0, model.config.vocab_size, (len(lengths),))
        ref = model(tokens[:, None], cache=caches[0].batch(0, len(lengths)), logits_to_keep=1)
        got = decoder.step(tokens, caches[1].batch(0, len(lengths)))
    assert caches[0].lengths == caches[1].lengths == [n + 1 for n in lengths]
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-5, atol=1e-6)
    return ref[:, -1], got


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_heads": 1},
        {"n_kv_heads": 4, "bias": True},
        GPT2,
        {**GPT2, "mlp": "relu"},
        {"mlp": "geglu_tanh"},
    ],
    ids=["gqa", "mqa", "mha-bias", "gpt2", "relu", "geglu-tanh"],
)
@pytest.mark.parametrize("lengths", [[7], [5, 5, 5], [3, 11, 6]], ids=["one", "uniform", "ragged"])
def test_logits_match_the_python_model(ext, overrides, lengths):
    model = model_of(**overrides)
    assert fast_decode.unsupported(model) is None
    ref, got = step_both(model, fast_decode.FastDecoder(model, ext), lengths)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_use_the_same_kernels(ext, bits):
    model = quantize_model(model_of(n_kv_heads=4), "rtn", bits, 32)
    assert fast_decode.unsupported(model) is None
    ref, got = step_both(model, fast_decode.FastDecoder(model, ext), [4, 9])
    # Same weight-only kernels on the same bf16-rounded activations: equal up to fp32 rounding.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def greedy(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    requests = [engine.submit(p, params) for p in prompts]
    engine.run()
    return [r.generation.tokens for r in requests]


def test_engine_generates_the_same_tokens_with_and_without_it(ext, monkeypatch):
    """Continuous batching with requests of different lengths joining and leaving (slots move):
    every token the C++ step picks is the Python model's."""
    model = model_of(seed=3)
    prompts = [[1 + i, 2, 3, 4][: 1 + i % 4] * (1 + i) for i in range(6)]
    fast = Engine(model, max_batch=3)
    assert fast.fast is not None
    got = greedy(fast, prompts, 12)
    monkeypatch.setenv("LMFORGE_FAST_DECODE", "0")
    slow = Engine(copy.deepcopy(model), max_batch=3)
    assert slow.fast is None
    assert got == greedy(slow, prompts, 12)


def test_weights_are_shared_not_copied(ext):
    """An in-place weight update (an optimizer step, load_state_dict) reaches the C++ step."""
    model = model_of()
    decoder = fast_decode.FastDecoder(model, ext)
    with torch.no_grad():
        model.blocks[1].mlp.w_out.weight.mul_(3.0)
        model.norm.weight.add_(0.5)
    ref, got = step_both(model, decoder, [6])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"position": "alibi"}, "position"),
        ({"attention": "sliding", "window": 8}, "attention"),
        ({"qk_norm": True}, "qk_norm"),
        ({"arch": "prefix"}, "arch"),
        ({"mlp": "geglu", "position": "sinusoidal"}, "position"),
    ],
)
def test_other_architectures_decode_in_python(overrides, reason):
    assert reason in fast_decode.unsupported(model_of(**overrides))


def test_wrapped_training_or_hooked_models_decode_in_python():
    from lmforge.adapt.peft import PeftConfig, add_adapter

    model = model_of()
    lora = copy.deepcopy(model)
    add_adapter(lora, PeftConfig(method="lora"))
    assert "hooks" in fast_decode.unsupported(lora.eval())
    assert "training" in fast_decode.unsupported(copy.deepcopy(model).train())
    hooked = copy.deepcopy(model)
    hooked.blocks[0].register_forward_hook(lambda *a: None)
    assert "hooks" in fast_decode.unsupported(hooked)
    assert "Slowed" in fast_decode.unsupported(type("Slowed", (torch.nn.Module,), {})())


def test_a_full_cache_is_an_error_not_a_write_past_the_end(ext):
    model = model_of()
    decoder = fast_decode.FastDecoder(model, ext)
    cache = SlotKVCache(model.config, 1, 8)
    cache.lengths[0] = 8
    with pytest.raises(RuntimeError, match="KV cache is full"):
        decoder.step(torch.tensor([1]), cache.batch(0, 1))


def test_without_a_compiler_the_engine_falls_back(monkeypatch):
    monkeypatch.setattr(fast_decode, "_extension", None)
    monkeypatch.setattr(fast_decode, "_build_error", None)

    def no_compiler(*args, **kwargs):
        raise OSError("c++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    model = model_of()
    engine = Engine(model, max_batch=1)
    assert engine.fast is None and "command not found" in fast_decode._build_error
    assert len(greedy(engine, [[1, 2, 3]], 4)[0]) == 4


def test_an_adapter_added_after_the_engine_was_built_is_honoured(ext, monkeypatch):
    from lmforge.adapt.peft import PeftConfig, add_adapter

    model = model_of(seed=5)
    engine = Engine(model, max_batch=1)
    assert engine.fast is not None and engine.fast.current()
    adapter = add_adapter(model, PeftConfig(method="lora"))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)  # B starts at zero: make the update visible
    model.eval()
    assert not engine.fast.current()
    monkeypatch.setenv("LMFORGE_FAST_DECODE", "0")
    prompt = [1, 2, 3, 4]
    expected = greedy(Engine(model, max_batch=1), [prompt], 8)
    assert greedy(engine, [prompt], 8) == expected


def test_a_build_killed_midway_does_not_block_later_loads(ext):
    """PyTorch's build lock is a plain file: a first compile interrupted by Ctrl-C leaves it,
    and without lmforge's own OS lock every later load would wait for it forever."""
    import subprocess
    import sys

    (fast_decode.build_directory() / "lock").touch()  # what the killed build left behind
    code = "from lmforge.infer import fast_decode; assert fast_decode.extension() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not (fast_decode.build_directory() / "lock").exists()
