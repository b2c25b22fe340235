"""Every shipped preset builds: tiny ones for real (and run), real sizes on the meta device with
the parameter counts of the published models."""

import pytest
import torch

from lmforge.config import build, load_yaml
from lmforge.model import Transformer
from lmforge.model_describe import RECIPE_DIR, load_model_config, meta_model
from lmforge.train.pretrain import PretrainConfig

MODEL_RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if "model" in load_yaml(p))
TINY = [name for name in MODEL_RECIPES if name.endswith("-tiny")]

# (parameters, relative tolerance): exact counts of the reference implementations
# (transformers' GPT2LMHeadModel, BertForPreTraining, T5ForConditionalGeneration,
# LlamaForCausalLM, BloomForCausalLM); rounded ones from the papers (PaLM Table 1: 8.63B;
# GPT-3: 175B) within 1%.
KNOWN = {
    "gpt2-124m": (124_439_808, 0),
    "bert-base": (110_106_428, 0),
    "t5-base": (222_903_552, 0),  # the T5 paper rounds it to "220M"
    "llama-7b": (6_738_415_616, 0),
    "bloom-560m": (559_214_592, 0),
    "palm-8b": (8.63e9, 0.01),
    "gpt3-175b": (175e9, 0.01),
}


def test_every_style_has_a_tiny_and_a_real_preset():
    for style, real in [
        ("gpt2", "gpt2-124m"),
        ("palm", "palm-8b"),
        ("llama", "llama-7b"),
        ("bloom", "bloom-560m"),
        ("t5", "t5-base"),
        ("bert", "bert-base"),
        ("glm", "glm-130b"),
    ]:
        assert f"{style}-tiny" in TINY and real in MODEL_RECIPES
    assert set(KNOWN) | {"glm-130b"} <= set(MODEL_RECIPES)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_real_size_parameter_counts(name):
    model = meta_model(load_model_config(name))
    assert all(p.is_meta for p in model.parameters())
    expected, tolerance = KNOWN[name]
    assert abs(model.num_params() - expected) <= tolerance * expected, model.num_params()


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_instantiate_run_and_load_as_pretrain_configs(name, tmp_path):
    config = build(PretrainConfig, RECIPE_DIR / f"{name}.yaml", [f"--data={tmp_path}"])
    assert config.model.vocab_size >= 4096 + 107  # demo BPE + reserved objective tokens
    torch.manual_seed(0)
    model = Transformer(config.model)
    ids = torch.randint(0, 4096, (2, 16))
    kwargs = {}
    if config.model.arch == "encoder_decoder":
        kwargs["decoder_input_ids"] = ids[:, :5]
    if config.model.arch == "prefix":
        kwargs["prefix_len"] = torch.tensor([4, 9])
    logits = model(ids, **kwargs)
    assert logits.shape == (2, 5 if kwargs.get("decoder_input_ids") is not None else 16, 4224)
    assert torch.isfinite(logits).all()
    assert model.num_params() < 3e6  # trains on a laptop CPU
