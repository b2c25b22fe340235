"""GGUF import: dequantization against the gguf package, models written by gguf's own writer
against transformers' model code, tokenizers against reference tokenizers, and corrupt files."""

import json
import struct

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as Q

import lmforge
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.ggml import dequantize
from lmforge.interop.gguf import load_gguf, unpermute_rope_rows
from lmforge.interop.gguf_file import GGUFFile
from lmforge.tokenizer import train_bpe
from lmforge.tokenizer.gguf import tokenizer_from_gguf

transformers = pytest.importorskip("transformers")

# Byte offsets of each block's float16 fields, so random blocks hold finite scales.
F16_FIELDS = {
    Q.Q8_0: [0],
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
}


def random_blocks(qtype: Q, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        scales = rng.uniform(-1, 1, n_blocks).astype(np.float16)
        raw[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qtype):
    block_size, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 24)
    shape = (3, 8 * block_size)
    expected = quants.dequantize(raw, qtype).reshape(shape)
    torch.testing.assert_close(dequantize(raw, qtype, shape), torch.from_numpy(expected))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.F32])
def test_dequantize_plain_types(qtype):
    values = np.linspace(-3, 3, 64, dtype=np.float32).reshape(2, 32)
    stored = quants.quantize(values, qtype)
    expected = torch.from_numpy(quants.dequantize(stored, qtype).astype(np.float32))
    torch.testing.assert_close(dequantize(stored.view(np.uint8), qtype, (2, 32)), expected)


def test_q4_1_block_formula_written_out():
    # ggml-common.h block_q4_1: d, m (float16), then 16 bytes; value j is d*q_j + m, where the
    # low nibbles hold q_0..q_15 and the high nibbles q_16..q_31.
    d, m = np.float16(0.5), np.float16(-2.0)
    q = np.arange(32) % 16
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([d, m]).view(np.uint8), packed])
    expected = torch.tensor(0.5 * q - 2.0, dtype=torch.float32)[None]
    torch.testing.assert_close(dequantize(block, Q.Q4_1, (1, 32)), expected)


def test_dequantize_rejects_wrong_sizes():
    with pytest.raises(CheckpointError, match="multiple of 32"):
        dequantize(np.zeros(34, np.uint8), Q.Q8_0, (1, 30))
    with pytest.raises(CheckpointError, match="needs 68 bytes"):
        dequantize(np.zeros(34, np.uint8), Q.Q8_0, (2, 32))


# ---------------------------------------------------------------- models written with GGUFWriter

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
HF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    module, _, param = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        _, _, i, rest = module.split(".", 3)
        return f"blk.{i}.{HF_NAMES[rest]}.{param}"
    return f"{HF_NAMES[module]}.{param}"


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's two RoPE halves."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def byte_level_vocab(tokenizer) -> tuple[list[str], list[str], list[int]]:
    """tokens, merges and token types of an lmforge (HF tokenizers) byte-level BPE tokenizer."""
    model = json.loads(tokenizer.backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = set(tokenizer.backend.get_added_tokens_decoder().values())
    types = [3 if any(s.content == t for s in special) else 1 for t in tokens]
    return tokens, merges, types


@pytest.fixture(scope="module")
def bpe_tokenizer():
    texts = ["The quick brown fox jumps over the lazy dog 1234 times."] * 20 + [
        "def f(x):\n    return x  # café naïve 日本 🚀"
    ] * 20
    return train_bpe(texts, 300, min_frequency=1)


def write_gguf(path, hf_model, arch: str, tokenizer, weight_type: Q = Q.F32) -> None:
    """A GGUF file the way convert_hf_to_gguf.py lays out a Llama/Qwen2 model."""
    c = hf_model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    writer.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    tokens, merges, types = byte_level_vocab(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            w = permute_like_llama_cpp(w, heads)
        qtype = weight_type if w.ndim == 2 else Q.F32  # llama.cpp keeps norms and biases in F32
        writer.add_tensor(gguf_name(name), quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_trip_through(hf_model, weight_type: Q) -> None:
    """Give the HF model the weights the GGUF file holds: quantized then dequantized."""
    with torch.no_grad():
        for p in hf_model.parameters():
            if p.ndim == 2:
                w = p.numpy()
                p.copy_(
                    torch.from_numpy(
                        quants.dequantize(quants.quantize(w, weight_type), weight_type)
                    )
                )


def random_hf(kind: str, vocab: int, tie: bool, seed: int = 0):
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config_cls(**SIZES, vocab_size=vocab, tie_word_embeddings=tie)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norm weights and biases matter too
    return model.eval()


@pytest.mark.parametrize(
    "kind, tie, weight_type",
    [
        ("llama", False, Q.F32),
        ("llama", True, Q.Q8_0),
        ("qwen2", True, Q.F16),
        ("llama", False, Q.Q4_1),
    ],
    ids=["llama-f32", "llama-tied-q8_0", "qwen2-f16-bias", "llama-q4_1"],
)
def test_gguf_logits_match_transformers(tmp_path, bpe_tokenizer, kind, tie, weight_type):
    hf_model = random_hf(kind, bpe_tokenizer.vocab_size, tie)
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model, kind, bpe_tokenizer, weight_type)
    round_trip_through(hf_model, weight_type)
    model = lmforge.load(path)
    ids = torch.randint(
        0, bpe_tokenizer.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=1e-4)
    assert model.config.tie_embeddings == tie
    assert model.config.has_qkv_bias == (kind == "qwen2")


def test_gguf_byte_level_tokenizer_matches_source(tmp_path, bpe_tokenizer):
    path = tmp_path / "model.gguf"
    write_gguf(path, random_hf("llama", bpe_tokenizer.vocab_size, True), "llama", bpe_tokenizer)
    tok = lmforge.load_tokenizer(path)
    for text in [
        "The lazy dog's 1234 jumps",
        "  spaces\tand\n\nnewlines ",
        "café 日本 🚀 naïve",
        "",
    ]:
        assert tok.encode(text) == bpe_tokenizer.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == bpe_tokenizer.eos_id and not tok.adds_bos
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    back = unpermute_rope_rows(torch.from_numpy(permute_like_llama_cpp(w, 3)), 3)
    assert torch.equal(back, torch.from_numpy(w))


def test_convert_gguf_to_lmforge_checkpoint(tmp_path, bpe_tokenizer):
    from lmforge.interop.hf import convert

    path = tmp_path / "model.gguf"
    write_gguf(
        path, random_hf("llama", bpe_tokenizer.vocab_size, False), "llama", bpe_tokenizer, Q.Q8_0
    )
    out = convert(path, tmp_path / "ckpt", to="lmforge")
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(lmforge.load(out)(ids), load_gguf(path)(ids))
    saved = lmforge.load_tokenizer(out)
    assert saved.encode("the dog") == bpe_tokenizer.encode("the dog") and not saved.adds_bos


# --------------------------------------------------------------------- SentencePiece vocabularies


def spm_reference(text: str, pieces: dict[str, float]) -> list[str]:
    """SentencePiece BPE written out: repeatedly merge the adjacent pair whose concatenation is
    the highest-scoring vocabulary piece (leftmost on ties); unknown characters become bytes."""
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in pieces and (
                best is None or pieces[merged] > pieces[symbols[best] + symbols[best + 1]]
            ):
                best = i
        if best is None:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    out = []
    for s in symbols:
        out += [s] if s in pieces else [f"<0x{b:02X}>" for b in s.encode()]
    return out


def test_sentencepiece_vocabulary_matches_written_out_algorithm():
    chars = list("▁abcdehlorw")
    merged = [
        "▁h",
        "he",
        "ll",
        "llo",
        "▁he",
        "▁hello",
        "or",
        "▁w",
        "▁wor",
        "ld",
        "▁world",
        "ab",
        "abc",
    ]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *bytes_, *chars, *merged]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(chars) + len(merged))]
    # Longer pieces score higher except "ll" beats "he", to make the merge order matter.
    scores = (
        [0.0] * (3 + 256)
        + [-100.0] * len(chars)
        + [-len(m) + (5 if m == "ll" else 0) for m in merged]
    )
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    tok = tokenizer_from_gguf(meta)
    pieces = {t: s for t, s, k in zip(tokens, scores, types) if k == 1}
    for text in ["hello world", "abc hello", "world hello abcd", "héllo wörld", "hello  world"]:
        ids = tok.encode(text)
        assert [tok.id_to_token(i) for i in ids] == spm_reference(text, pieces), text
        assert tok.decode(ids) == text
    assert tok.adds_bos and tok.encode("hello", add_bos=True)[0] == 1


# ------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, bpe_tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(
        path, random_hf("llama", bpe_tokenizer.vocab_size, True), "llama", bpe_tokenizer, Q.Q8_0
    )
    return path.read_bytes()


def test_truncated_files_give_clear_errors(tmp_path, small_gguf):
    path = tmp_path / "cut.gguf"
    for cut in [0, 3, 4, 10, 24, 100, 1000, len(small_gguf) // 2, len(small_gguf) - 1]:
        path.write_bytes(small_gguf[:cut])
        with pytest.raises(CheckpointError, match="GGUF|gguf"):
            GGUFFile(path) if cut >= 4 else load_gguf(path)


def test_fuzzed_headers_never_crash(tmp_path, small_gguf):
    """Random byte flips in the header and directory: either a model or a clear error."""
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.gguf"
    header_end = small_gguf.find(b"token_embd") + 200
    for _ in range(150):
        data = bytearray(small_gguf)
        for at in rng.integers(4, header_end, size=rng.integers(1, 4)):
            data[at] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            GGUFFile(path)
        except (CheckpointError, ConfigError) as e:
            assert str(path) in str(e)


def test_lying_array_count_is_rejected_before_allocating(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    data += struct.pack("<Q", 3) + b"big" + struct.pack("<IIQ", 9, 6, 2**60)  # float32[2**60]
    path = tmp_path / "lie.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="claims 1152921504606846976 elements"):
        GGUFFile(path)


def test_unknown_tensor_type_and_architecture(tmp_path, small_gguf):
    path = tmp_path / "bad.gguf"
    # The directory entry of the first tensor: name, n_dims, dims, type, offset.
    at = small_gguf.find(b"token_embd.weight") + len("token_embd.weight")
    n_dims = struct.unpack_from("<I", small_gguf, at)[0]
    type_at = at + 4 + 8 * n_dims
    path.write_bytes(small_gguf[:type_at] + struct.pack("<I", 77) + small_gguf[type_at + 4 :])
    with pytest.raises(CheckpointError, match="unknown ggml type 77"):
        GGUFFile(path)
    path.write_bytes(small_gguf.replace(b"llama", b"mamba"))
    with pytest.raises(ConfigError, match="architecture 'mamba' is not supported"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="magic"):
        GGUFFile(path)
    with pytest.raises(CheckpointError, match="is not a model"):
        lmforge.load(path)
