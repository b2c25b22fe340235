"""`lmforge sft` end to end on a tiny model for every method, from an lmforge checkpoint and a
Hugging Face directory."""

import json

import pytest
import torch

from lmforge.adapt.peft import load_adapter
from lmforge.cli import main
from lmforge.interop.hf import export_hf
from lmforge.loading import load
from lmforge.train.checkpoint import save_model


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "prefix", "prompt"])
def test_sft_command(model, tokenizer, tmp_path, method):
    src = tmp_path / "base"
    (export_hf if method == "lora" else save_model)(model, src, tokenizer=tokenizer)
    out = tmp_path / "sft"
    args = [
        "sft", f"--model={src}", f"--out={out}", f"--method={method}", "--synthetic_per_task=6",
        "--languages=[en]", "--synthetic_tasks=[comparison,reversing]", "--eval_items=2",
        "--max_new_tokens=4", "--train.steps=3", "--train.batch_size=2", "--train.seq_len=96",
        "--prompt.n_tokens=4", "--prefix.n_tokens=4", f"--packing={method != 'prompt'}".lower(),
    ]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "sft.json").read_text())
    assert result["train"]["steps"] == 3 and result["eval_items"] == 4
    assert result["exact_match_after"] is not None
    assert result["mixing"]["comparison"]["examples"] == 6
    base = load(src)
    tuned = load(out / "model")
    same = all(torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                  tuned.state_dict().values()))  # fmt: skip
    if method == "full":
        assert not same and not (out / "model" / "adapter.yaml").exists()
        assert result["trainable_parameters"] == result["total_parameters"]
    else:
        assert same  # the base is untouched; the adapter is saved beside it
        assert result["trainable_parameters"] < result["total_parameters"] / 2
        load_adapter(tuned, out / "model")


def test_sft_rejects_prompt_tuning_with_packing(model, tokenizer, tmp_path, capsys):
    save_model(model, tmp_path / "base", tokenizer=tokenizer)
    args = ["sft", f"--model={tmp_path / 'base'}", "--method=prompt", "--packing=true",
            f"--out={tmp_path / 'o'}"]  # fmt: skip
    assert main(args) == 1
    assert "no --packing" in capsys.readouterr().err
