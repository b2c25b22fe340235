import pytest

from lmforge.model import ModelConfig
from lmforge.scaling.laws import CHINCHILLA, ChinchillaLaw
from lmforge.scaling.plan import format_plan, plan


def test_plan_by_flops_follows_the_law():
    p = plan(1e21)
    n, d = CHINCHILLA.compute_optimal(1e21)
    assert p["n_opt"] == pytest.approx(n) and p["d_opt"] == pytest.approx(d)
    assert p["tokens_per_parameter"] == pytest.approx(d / n)
    assert p["loss"] == pytest.approx(1.69 + 406.4 / n**0.34 + 410.7 / d**0.28)
    assert p["train"]["tokens"] == int(d)


def test_plan_by_gpu_hours_uses_the_peak_table():
    p = plan(gpu_hours=1000, gpu="a100", mfu=0.5)
    assert p["flops"] == pytest.approx(1000 * 3600 * 312e12 * 0.5)
    assert plan(gpu_hours=10)["flops"] == pytest.approx(10 * 3600 * 989e12 * 0.4)
    with pytest.raises(ValueError, match="unknown gpu"):
        plan(gpu_hours=10, gpu="tpu")
    with pytest.raises(ValueError, match="exactly one"):
        plan(1e20, gpu_hours=10)


def test_plan_uses_the_given_law():
    law = ChinchillaLaw(E=1.8, A=500.0, B=300.0, alpha=0.3, beta=0.3)
    assert plan(1e20, law=law)["n_opt"] == pytest.approx(law.compute_optimal(1e20)[0])


@pytest.mark.parametrize("flops", [1e19, 1e21, 5.76e23])
def test_recommended_model_is_near_n_opt_and_llama_shaped(flops):
    p = plan(flops)
    m: ModelConfig = p["model"]
    assert abs(p["model_params"] / p["n_opt"] - 1) < 0.2
    assert m.d_model % 64 == 0 and m.dim_head in (64, 128)
    assert 64 <= m.d_model / m.n_layers <= 128
    assert m.vocab_size == 32768 and m.mlp == "swiglu" and m.position == "rope"


def test_recipe_is_consistent():
    t = plan(1e21)["train"]
    assert t["batch_tokens"] == t["batch_size"] * t["seq_len"]
    assert t["steps"] * t["batch_tokens"] >= t["tokens"] > (t["steps"] - 1) * t["batch_tokens"]
    assert t["warmup_steps"] == round(0.01 * t["steps"])
    assert 1e-5 < t["lr"] < 1e-2


def test_format_plan_lists_the_numbers():
    text = format_plan(plan(gpu_hours=100))
    assert "h100 GPU-hours" in text and "tokens per parameter" in text and "d_model=" in text
