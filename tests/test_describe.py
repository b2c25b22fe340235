"""`lmforge model describe`: parameter, FLOP and memory numbers against formulas written out."""

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.model_describe import DescribeConfig, describe

# GPT-2 small, by hand: V=50257, T_max=1024, d=768, L=12, H=12 (head 64), MLP 4d, biases.
V, P, D, L, H = 50257, 1024, 768, 12, 12
EMBEDDING = V * D + P * D
PER_LAYER = (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + 2 * 2 * D
TOTAL = EMBEDDING + L * PER_LAYER + 2 * D  # + the final LayerNorm; the output layer is tied
MATMUL = L * 12 * D * D + V * D  # every Linear weight, the (tied) output layer included


def test_gpt2_numbers_match_hand_formulas():
    d = describe(DescribeConfig(recipe="gpt2-124m", batch=2, seq=512))
    assert TOTAL == 124_439_808 == d["params"]
    assert d["embedding_params"] == EMBEDDING
    assert d["non_embedding_params"] == TOTAL - EMBEDDING
    # PaLM App. B: 6N + 12 L H Dh T per training token; the forward pass is a third of it.
    assert d["flops_per_token_training"] == 6 * MATMUL + 12 * L * H * 64 * 512
    assert d["flops_per_token_forward"] == pytest.approx(2 * MATMUL + 4 * L * H * 64 * 512)
    assert d["weights_bytes"] == d["gradients_bytes"] == 4 * TOTAL
    assert d["optimizer_bytes"] == 8 * TOTAL  # AdamW m and v in fp32
    # Korthikanti et al. 2022: per layer s b h (34 + 5 a s / h) bytes.
    s, b = 512, 2
    assert d["activations_bytes"] == L * (s * b * D * 34 + 5 * H * s * s * b)
    assert d["logits_bytes"] == 4 * b * s * V


def test_precision_optimizer_and_recomputation_options():
    d = describe(
        DescribeConfig(
            recipe="gpt2-124m", seq=1024, dtype="bf16", optimizer="adamw8bit", recompute="selective"
        )
    )
    assert d["weights_bytes"] == 2 * TOTAL
    # 8-bit moments: 2 bytes a parameter plus block scales; small tensors (biases, norms) in fp32.
    assert 2 * TOTAL < d["optimizer_bytes"] < 2.02 * TOTAL
    assert d["activations_bytes"] == L * 1024 * D * 34
    full = describe(DescribeConfig(recipe="gpt2-124m", seq=1024, recompute="full"))
    assert full["activations_bytes"] == L * 2 * 1024 * D


def test_llama_7b_is_described_without_allocating(capsys):
    assert main(["model", "describe", "llama-7b", "--batch=1", "--seq=2048"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "Korthikanti" in out and "PaLM App. B" in out
    # fp32 weights + gradients + AdamW m and v: 16 bytes a parameter.
    d = describe(DescribeConfig(recipe="llama-7b"))
    assert d["weights_bytes"] + d["gradients_bytes"] + d["optimizer_bytes"] == 16 * 6_738_415_616


def test_describes_a_yaml_file_and_a_model_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("vocab_size: 100\nd_model: 32\nn_layers: 1\n")
    (tmp_path / "run.yaml").write_text("model: {vocab_size: 100, d_model: 32, n_layers: 1}\n")
    a = describe(DescribeConfig(recipe=str(tmp_path / "m")))
    b = describe(DescribeConfig(recipe=str(tmp_path / "run.yaml")))
    assert a["params"] == b["params"] > 0
    with pytest.raises(ConfigError, match="not a file, a model directory or one of: .*llama-7b"):
        describe(DescribeConfig(recipe="no-such-recipe"))
