"""PEFT-format LoRA adapters: our export loads with the `peft` library onto the transformers model
with the same logits, and an adapter made by `peft` imports into lmforge with the same logits."""

import pytest
import torch

from lmforge.adapt.peft import LoRAConfig, PeftConfig, add_adapter
from lmforge.interop.hf import export_hf
from lmforge.interop.peft import export_peft, import_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q", "k", "v", "out", "gate", "up", "w_out"]


def _randomize(adapter) -> None:
    # B starts at zero (the update is 0); give it values so the test sees the update.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter.layers.values():
            for p in layer.B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def test_export_loads_in_peft_with_same_logits(model, tmp_path):
    export_hf(model, tmp_path / "base")
    cfg = PeftConfig(method="lora", lora=LoRAConfig(r=4, alpha=8, targets=TARGETS, rslora=True))
    _randomize(add_adapter(model, cfg))
    export_peft(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    ref = peft.PeftModel.from_pretrained(_hf_model(tmp_path / "base"), tmp_path / "adapter").eval()
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ours, theirs = model(x), ref(input_ids=x).logits
    with torch.no_grad(), ref.disable_adapter():
        base = ref(input_ids=x).logits
    assert (theirs - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_peft_adapter_imports_with_same_logits(model, tmp_path):
    export_hf(model, tmp_path / "base")
    lora = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
        init_lora_weights=False,  # random A and B: a non-zero update
    )  # fmt: skip
    ref = peft.get_peft_model(_hf_model(tmp_path / "base"), lora).eval()
    ref.save_pretrained(tmp_path / "adapter")
    import_peft(model, tmp_path / "adapter")
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(input_ids=x).logits, atol=1e-5, rtol=1e-4)


def test_gpt2_family_is_refused(tmp_path):
    from lmforge.errors import ConfigError
    from lmforge.model import ModelConfig, Transformer

    gpt2 = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                   position="learned", norm="layernorm", mlp="gelu_tanh",
                                   bias=True))  # fmt: skip
    add_adapter(gpt2, PeftConfig(method="lora"))
    with pytest.raises(ConfigError, match="Llama family"):
        export_peft(gpt2, tmp_path / "a")
