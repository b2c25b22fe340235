"""GGUF export: block quantizers against the gguf package's reference (bit for bit), exported
models read back by our GGUF import against the same model with its weights passed through the
reference quantizer, tokenizers, errors; slow: llama.cpp (llama-cpp-python) runs the files."""

from itertools import islice

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import lmforge
from lmforge.compress.prune import structured_prune
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.gguf import load_gguf, load_gguf_tokenizer, smollm2_path, unpermute_rope_rows
from lmforge.interop.gguf_export import (
    convert_to_gguf,
    export_gguf,
    permute_rope_rows,
    quantize_q4_0,
    quantize_q8_0,
)
from lmforge.interop.gguf_file import GGUFFile
from lmforge.model import ModelConfig, Transformer
from lmforge.stages import ConvertConfig, convert
from lmforge.tokenizer import Tokenizer, train_bpe
from lmforge.train.checkpoint import save_model

QTYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
TEXTS = [
    "The quick brown fox jumps over the lazy dog 1234 times.",
    "def f(x):\n    return x  # café",
]


def tricky_blocks(n: int = 512) -> np.ndarray:
    """Random blocks plus the edge cases of the rounding rules: an all-zero block, exact ties
    (k + 0.5 steps), a block whose largest magnitude is negative, and huge / tiny scales."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32)).astype(np.float32)
    x[0] = 0
    x[1] = (np.arange(32) - 15.5).astype(np.float32) * 127 / 16  # q = j - 15.5 steps: ties
    x[2] = np.linspace(-1, 0.5, 32, dtype=np.float32)
    x[3] *= 1e4
    x[4] *= 1e-6
    x[5, :] = 1.0
    return x


@pytest.mark.parametrize(("quantize", "qtype"), [(quantize_q8_0, Q.Q8_0), (quantize_q4_0, Q.Q4_0)])
def test_block_quantizers_equal_gguf_reference_bit_for_bit(quantize, qtype):
    x = tricky_blocks()
    ours = quantize(torch.from_numpy(x)).numpy()
    reference = quants.quantize(x, qtype).reshape(ours.shape)
    np.testing.assert_array_equal(ours, reference)


def test_q8_0_block_written_out():
    # block_q8_0 (ggml-common.h): float16 d = max|x| / 127, then int8 q_j = roundf(x_j / d).
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([2.54, -1.27, 0.01, 0.03])  # d = 0.02: 127, -63.5 -> -64, 0.5 -> 1
    raw = quantize_q8_0(x)
    d = raw[:, :2].view(torch.float16).item()
    assert d == pytest.approx(0.02, rel=1e-3)
    assert raw[0, 2:6].view(torch.int8).tolist() == [127, -64, 1, 2]


def test_q4_0_block_written_out():
    # block_q4_0: d = m / -8 for the value m of largest magnitude; q = trunc(x / d + 8.5) capped
    # at 15; byte j = q_j | q_{j+16} << 4.
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 16] = -4.0, 2.0, 1.0  # d = 0.5: q = 0, 12, 10; zeros -> 8
    raw = quantize_q4_0(x)
    assert raw[:, :2].view(torch.float16).item() == 0.5
    assert raw[0, 2] == 0 | (10 << 4) and raw[0, 3] == 12 | (8 << 4) and raw[0, 4] == 8 | (8 << 4)


def test_permute_inverts_unpermute():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, 4), 4), w)
    # Head 0's rows 0..7 (halves 0-3 | 4-7) become the interleaved pairs 0,4,1,5,2,6,3,7.
    order = permute_rope_rows(torch.arange(32.0)[:, None], 4)[:8, 0]
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS * 20, 300, min_frequency=1)


def small_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    settings = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    settings.update(max_seq_len=64, init_std=0.05)
    settings.update(overrides)
    return Transformer(ModelConfig(**settings)).eval()


def reference_weights(model: Transformer, qtype: Q) -> Transformer:
    """A copy of `model` whose matrices went through the gguf package's numpy quantizer and back
    (the file's values, computed independently of the exporter)."""
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2 and qtype != Q.F32:
                w = p.numpy()
                p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, qtype), qtype)))
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("gguf_type", list(QTYPES))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_exported_file_loads_back_to_the_same_logits(tmp_path, tokenizer, kind, gguf_type):
    model = small_model(qkv_bias=kind == "qwen2", tie_embeddings=kind == "llama")
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, gguf_type=gguf_type)
    gguf = GGUFFile(path)
    assert gguf.get("general.architecture") == kind
    assert ("output.weight" in gguf.tensors) == (kind == "qwen2")
    assert gguf.tensors["blk.0.attn_q.weight"].qtype == QTYPES[gguf_type]
    assert gguf.tensors["blk.0.attn_norm.weight"].qtype == Q.F32
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    loaded = load_gguf(path)
    assert loaded.config.n_kv_heads == 2 and loaded.config.has_qkv_bias == (kind == "qwen2")
    # Exact: the file holds exactly the reference quantizer's values, in the same layout.
    expected = logits(reference_weights(model, QTYPES[gguf_type]), ids)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    # Against the float32 model, the cost of the format: measured max |error| 0.001 (f16), 0.02
    # (q8_0), 0.34 (q4_0) on logits of std 0.4; random Gaussian weights are hard on 4 bits.
    tolerance = {"f32": 0, "f16": 0.005, "q8_0": 0.05, "q4_0": 0.6}[gguf_type]
    err = (logits(loaded, ids) - logits(model, ids)).abs().max().item()
    assert err <= tolerance


def test_tokenizer_round_trips(tmp_path, tokenizer):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = Tokenizer(tokenizer.backend, chat_template=template)
    model = small_model()
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, gguf_type="f32")
    back = load_gguf_tokenizer(path)
    for text in [*TEXTS, "unseen wörds 987 <|bos|> 🚀"]:
        assert back.encode(text) == tokenizer.encode(text)
    assert (back.bos_id, back.eos_id, back.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, 2)
    assert back.chat_template == tokenizer.chat_template and back.adds_bos == tokenizer.adds_bos
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    # The model has 320 embedding rows, the tokenizer 300 tokens: unused padding tokens (5).
    assert len(meta["tokenizer.ggml.tokens"]) == 320
    assert meta["tokenizer.ggml.tokens"][300] == "[PAD300]"
    assert list(meta["tokenizer.ggml.token_type"][:5]) == [3] * 5  # <|bos|> ... are control
    assert set(meta["tokenizer.ggml.token_type"][300:]) == {5}


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path):
    model = small_model(d_ff=48)  # ffn_down rows hold 48 values: not a multiple of 32
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="q4_0")
    gguf = GGUFFile(path)
    assert gguf.tensors["blk.0.ffn_down.weight"].qtype == Q.F16
    assert gguf.tensors["blk.0.ffn_up.weight"].qtype == Q.Q4_0
    assert load_gguf(path).config.d_ff == 48


def test_structured_pruned_model_without_tokenizer(tmp_path):
    # Two heads of 16 dims in a 64-wide model: head_dim is not d_model / n_heads any more.
    pruned, _ = structured_prune(small_model(), head_sparsity=0.5, mlp_sparsity=0.5)
    path = export_gguf(pruned, tmp_path / "m.gguf", gguf_type="f32")
    assert GGUFFile(path).get("tokenizer.ggml.model") == "none"  # llama.cpp's token-ids-only
    loaded = load_gguf(path)
    assert (loaded.config.n_heads, loaded.config.dim_head, loaded.config.ff_dim) == (2, 16, 96)
    ids = torch.randint(0, 320, (1, 16))
    torch.testing.assert_close(logits(loaded, ids), logits(pruned, ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"position": "learned"}, "position='learned'"),
        ({"norm": "layernorm"}, "norm='layernorm'"),
        ({"mlp": "gelu"}, "mlp='gelu'"),
        ({"bias": True}, "bias=True"),
    ],
)
def test_architectures_llama_cpp_cannot_express_are_refused(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        export_gguf(small_model(**overrides), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="gguf_type 'q4_k'"):
        export_gguf(small_model(), tmp_path / "m.gguf", gguf_type="q4_k")
    with pytest.raises(ConfigError, match="300 tokens but the model only vocab_size=256"):
        export_gguf(small_model(vocab_size=256), tmp_path / "m.gguf", tokenizer=tokenizer)
    model = small_model()
    model.blocks[0].attn.extra = torch.nn.Linear(2, 2)  # e.g. an adapter wrapped in
    with pytest.raises(ConfigError, match="no llama.cpp counterpart"):
        export_gguf(model, tmp_path / "m.gguf")


def test_convert_command_writes_gguf(tmp_path, tokenizer):
    model = small_model()
    save_model(model, tmp_path / "ckpt", tokenizer=tokenizer)
    out = convert(
        ConvertConfig(
            src=str(tmp_path / "ckpt"), dst=str(tmp_path / "m.gguf"), to="gguf", gguf_type="q8_0"
        )
    )
    assert GGUFFile(out).get("general.file_type") == 7  # LlamaFileType.MOSTLY_Q8_0
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    expected = logits(reference_weights(model, Q.Q8_0), ids)
    torch.testing.assert_close(logits(lmforge.load(out), ids), expected, rtol=0, atol=0)
    assert lmforge.load_tokenizer(out).encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])


# ---------------------------------------------------------------- llama.cpp itself (slow)


def trained_model(tokenizer) -> Transformer:
    """A small model fitted to TEXTS, so its greedy continuation is decided by wide margins."""
    model = small_model(vocab_size=tokenizer.vocab_size).train()
    ids = torch.tensor([tokenizer.encode(" ".join(TEXTS * 2))[:64]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def llama_cpp_logits(path, ids: list[int], n_ctx: int = 64):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0
    )
    llm.eval(ids)
    return llm, torch.from_numpy(np.array(llm.scores[: len(ids)]))


def greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", list(QTYPES))
def test_llama_cpp_runs_the_exported_model(tmp_path, tokenizer, gguf_type):
    model = trained_model(tokenizer)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, gguf_type=gguf_type)
    prompt = TEXTS[0][:20]
    ours = tokenizer.encode(prompt)
    llm, theirs = llama_cpp_logits(path, ours)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ours
    # llama.cpp multiplies F16/Q8_0/Q4_0 weights with activations rounded to F16/8 bits, so it
    # agrees with our forward on the file's own (dequantized) weights to within that rounding.
    on_file = logits(load_gguf(path), torch.tensor([ours]))[0]
    tolerance = {"f32": 1e-3, "f16": 0.05, "q8_0": 0.1, "q4_0": 0.3}[gguf_type]
    assert (theirs - on_file).abs().max().item() < tolerance
    continuation = list(islice(llm.generate(ours, top_k=1, temp=0.0, reset=True), 8))
    assert continuation == greedy(load_gguf(path), ours, 8)


@pytest.mark.slow
def test_llama_cpp_runs_a_structured_pruned_model(tmp_path):
    pruned, _ = structured_prune(small_model(), head_sparsity=0.5, mlp_sparsity=0.5)
    path = export_gguf(pruned, tmp_path / "m.gguf", gguf_type="f32")
    ids = list(range(5, 25))
    _, theirs = llama_cpp_logits(path, ids)
    assert (theirs - logits(pruned, torch.tensor([ids]))[0]).abs().max().item() < 1e-3


@pytest.mark.slow
def test_smollm2_exported_as_q8_0_runs_in_llama_cpp(tmp_path):
    try:
        source = smollm2_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    path = convert_to_gguf("smollm2", tmp_path / "smollm2-q8_0.gguf", gguf_type="q8_0")
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.tokens"] == GGUFFile(source).metadata["tokenizer.ggml.tokens"]
    tokenizer = lmforge.load_tokenizer("smollm2")
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    llm, theirs = llama_cpp_logits(path, ids, n_ctx=256)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    exported = lmforge.load(path)
    on_file = logits(exported, torch.tensor([ids]))[0]
    # Same 8-bit weights; llama.cpp also rounds activations to 8 bits (Q8_0 x Q8_0 dot products).
    assert (theirs.argmax(-1) == on_file.argmax(-1)).float().mean() > 0.9
    assert (theirs - on_file).abs().max().item() < 2.0
    continuation = list(islice(llm.generate(ids, top_k=1, temp=0.0, reset=True), 8))
    assert continuation == greedy(exported, ids, 8)
