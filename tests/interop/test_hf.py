"""Hugging Face interop: logits against transformers' own model code, export round trips, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.hf import convert, export_hf, hf_to_model_config, load_hf
from lmforge.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 128
LLAMA_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)

HF_CASES = {
    "llama-untied": lambda: transformers.LlamaConfig(**LLAMA_SIZES, tie_word_embeddings=False),
    "llama-tied": lambda: transformers.LlamaConfig(**LLAMA_SIZES, tie_word_embeddings=True),
    "llama-attention-bias": lambda: transformers.LlamaConfig(
        **LLAMA_SIZES, attention_bias=True, rope_parameters={"rope_theta": 500000.0}
    ),
    "llama-mlp-bias": lambda: transformers.LlamaConfig(**LLAMA_SIZES, mlp_bias=True),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_SIZES),
    "mistral-head-dim": lambda: transformers.MistralConfig(
        **LLAMA_SIZES, sliding_window=None, head_dim=32
    ),
    "gpt2": lambda: transformers.GPT2Config(**GPT2_SIZES),
}

LMFORGE_SIZES = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
LMFORGE_CASES = {
    "llama": ModelConfig(**LMFORGE_SIZES, n_kv_heads=2, tie_embeddings=False, rope_theta=1e5),
    "qwen2": ModelConfig(**LMFORGE_SIZES, qkv_bias=True),
    # HF Llama has no bias-free q/k/v beside a biased o_proj: exported as zero q/k/v biases.
    "llama-out-bias": ModelConfig(**LMFORGE_SIZES, bias=True, qkv_bias=False),
    "gpt2": ModelConfig(
        **LMFORGE_SIZES, norm="layernorm", mlp="gelu_tanh", position="learned", bias=True
    ),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so norm weights and biases (initialized to 1 and 0) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_model(config):
    return randomize(
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    )


def random_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: Transformer, ref, ids: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_checkpoint_matches_transformers(case, tmp_path):
    ref = hf_model(HF_CASES[case]())
    ref.save_pretrained(tmp_path)
    ours = lmforge.load(tmp_path)
    assert not ours.training
    ids = random_ids()
    assert_same_logits(ours, ref, ids)

    # Left padding: HF needs position ids that skip the pads; lmforge derives them from the mask.
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=0)


def test_sharded_checkpoint(tmp_path):
    ref = hf_model(HF_CASES["llama-untied"]())
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_logits(load_hf(tmp_path), ref, random_ids())


def test_pytorch_bin_fallback_with_original_gpt2_names(tmp_path):
    ref = hf_model(HF_CASES["gpt2"]())
    ref.config.save_pretrained(tmp_path)
    # OpenAI's GPT-2 files have no "transformer." prefix and carry the causal-mask buffers.
    sd = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items()}
    sd |= {
        "h.0.attn.bias": torch.ones(1, 1, 64, 64).tril(),
        "h.0.attn.masked_bias": torch.tensor(-1e4),
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_same_logits(load_hf(tmp_path), ref, random_ids())


def test_dtype_fp32_by_default_or_as_asked(tmp_path):
    ref = hf_model(HF_CASES["qwen2"]()).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    stored = ref.model.embed_tokens.weight
    fp32 = load_hf(tmp_path)
    assert fp32.embed.weight.dtype == torch.float32
    assert torch.equal(fp32.embed.weight, stored.float())
    bf16 = load_hf(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(bf16.embed.weight, stored)


@pytest.mark.parametrize("case", LMFORGE_CASES)
def test_export_round_trip_and_transformers_parity(case, tmp_path):
    torch.manual_seed(0)
    model = randomize(Transformer(LMFORGE_CASES[case]))
    out = export_hf(model, tmp_path / "hf")
    back = load_hf(out)
    before, after = model.state_dict(), back.state_dict()
    for name, tensor in after.items():
        if name in before:
            assert torch.equal(tensor, before[name]), name
        else:  # biases HF's family needs and lmforge's config leaves out
            assert name.endswith(".bias") and not tensor.any(), name
    assert set(before) <= set(after)

    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert_same_logits(model, ref.eval(), random_ids())


def test_export_shards_and_stores_tied_weights_once(tmp_path):
    model = randomize(Transformer(LMFORGE_CASES["gpt2"]))
    out = export_hf(model, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert "transformer.wte.weight" in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(load_hf(out)(ids), model(ids))


def write_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<s>": VOCAB - 2, "</s>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))


def test_convert_keeps_dtype_and_tokenizer(tmp_path):
    ref = hf_model(HF_CASES["llama-tied"]()).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")

    ckpt = convert(tmp_path / "hf", tmp_path / "lm", to="lmforge")
    assert (ckpt / "tokenizer.json").is_file()
    assert {t.dtype for t in load_file(str(ckpt / "model.safetensors")).values()} == {
        torch.bfloat16
    }
    assert torch.equal(lmforge.load(ckpt).embed.weight, ref.model.embed_tokens.weight.float())

    hf_dir = convert(ckpt, tmp_path / "hf2", to="hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["torch_dtype"], config["bos_token_id"], config["eos_token_id"]) == (
        "bfloat16",
        VOCAB - 2,
        VOCAB - 1,
    )
    assert (hf_dir / "tokenizer.json").is_file()
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = load_file(str(hf_dir / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)

    with pytest.raises(ConfigError, match="gguf"):
        convert(ckpt, tmp_path / "x", to="gguf")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="'mamba'.*llama"):
        lmforge.load(tmp_path)


def test_truncated_weights_name_the_file(tmp_path):
    hf_model(HF_CASES["llama-untied"]()).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lmforge.load(tmp_path)


def test_tied_checkpoint_with_a_different_head(tmp_path):
    ref = hf_model(HF_CASES["llama-tied"]())
    ref.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["lm_head.weight"] = torch.zeros_like(sd["model.embed_tokens.weight"])
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head"):
        load_hf(tmp_path)


@pytest.mark.parametrize(
    "hf, match",
    [
        ({**LLAMA_SIZES, "rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({**LLAMA_SIZES, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({**LLAMA_SIZES, "hidden_act": "gelu"}, "hidden_act"),
        (
            {
                **LLAMA_SIZES,
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 16,
                "max_window_layers": 1,
            },
            "sliding_window",
        ),
        ({**GPT2_SIZES, "model_type": "gpt2", "reorder_and_upcast_attn": True}, "reorder"),
        (
            {**GPT2_SIZES, "model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True},
            "scale_attn_by_inverse_layer_idx",
        ),
        ({**GPT2_SIZES, "model_type": "gpt2", "activation_function": "relu"}, "relu"),
        ({"model_type": "llama", "hidden_size": 64}, "lacks 'max_position_embeddings'"),
    ],
)
def test_unrepresentable_configs(hf, match):
    hf = {"model_type": "llama", **hf}
    with pytest.raises(ConfigError, match=match):
        hf_to_model_config(hf)


def test_rope_theta_of_transformers_4_configs():
    assert (
        hf_to_model_config({**LLAMA_SIZES, "model_type": "llama", "rope_theta": 5e5}).rope_theta
        == 5e5
    )


def test_inactive_sliding_windows_are_accepted():
    mistral = transformers.MistralConfig(**LLAMA_SIZES, sliding_window=64).to_dict()
    qwen2 = transformers.Qwen2Config(**LLAMA_SIZES, sliding_window=16).to_dict()
    assert hf_to_model_config(mistral).max_seq_len == 64
    assert hf_to_model_config(qwen2).qkv_bias


def test_export_without_matching_family(tmp_path):
    config = ModelConfig(**LMFORGE_SIZES, norm="layernorm", mlp="gelu")
    with pytest.raises(ConfigError, match="no Hugging Face model family"):
        export_hf(Transformer(config), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
