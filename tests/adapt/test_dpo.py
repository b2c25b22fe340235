"""DPO / IPO: the losses against their formulas written out, ln 2 at initialisation, the reference
untouched (LoRA: the base with adapters off), and bad preference data named."""

import copy
import json
import math

import pytest
import torch

from lmforge.adapt.dpo import DPOConfig, dpo, dpo_loss
from lmforge.adapt.optimize import AlignTrainConfig
from lmforge.adapt.peft import disabled_adapters
from lmforge.adapt.preference import PreferenceDataConfig
from lmforge.adapt.sequences import token_logprobs
from lmforge.cli import main
from lmforge.train.checkpoint import save_model

PC = torch.tensor([-3.0, -10.0, -2.5, -7.0])  # policy log p(chosen), summed over the response
PR = torch.tensor([-4.0, -9.0, -6.0, -7.5])
RC = torch.tensor([-3.5, -9.5, -2.0, -8.0])  # reference
RR = torch.tensor([-3.0, -9.0, -5.0, -7.0])


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_sigmoid_loss_formula(beta, eps):
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    for i in range(4):
        h = (PC[i] - RC[i]).item() - (PR[i] - RR[i]).item()
        expected = -(1 - eps) * math.log(_sigmoid(beta * h)) - eps * math.log(_sigmoid(-beta * h))
        assert losses[i].item() == pytest.approx(expected, rel=1e-5)
        assert rc[i].item() == pytest.approx(beta * (PC[i] - RC[i]).item())
        assert rr[i].item() == pytest.approx(beta * (PR[i] - RR[i]).item())


def test_ipo_loss_formula():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    for i in range(4):
        h = (PC[i] - RC[i]).item() - (PR[i] - RR[i]).item()
        assert losses[i].item() == pytest.approx((h - 1 / (2 * 0.25)) ** 2, rel=1e-5)


def test_loss_is_ln2_when_policy_is_reference():
    losses, _, _ = dpo_loss(PC, PR, PC, PR, beta=0.3, label_smoothing=0.1)
    assert torch.allclose(losses, torch.full((4,), math.log(2)))


def _config(tmp_path, **kw) -> DPOConfig:
    data = PreferenceDataConfig(tasks=["comparison"], per_task=8, eval_per_task=4, levels=[1])
    train = AlignTrainConfig(steps=kw.pop("steps", 3), batch_size=4, lr=1e-3, warmup_steps=0)
    return DPOConfig(
        model="tiny",
        out=str(tmp_path / "dpo"),
        data=data,
        train=train,
        eval_items=2,
        eval_harmful=1,
        kl_samples=4,
        max_new_tokens=4,
        **kw,
    )


@pytest.mark.parametrize(
    "method, reference",
    [("full", "precomputed"), ("full", "online"), ("lora", "precomputed"), ("lora", "online")],
)
def test_first_step_is_ln2_and_training_moves_it(
    make_model, tokenizer, tmp_path, method, reference
):
    model = make_model(0)
    result = dpo(
        _config(tmp_path, method=method, reference=reference, steps=4),
        model=model,
        tokenizer=tokenizer,
    )
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "dpo/metrics.jsonl").read_text().splitlines()
    ]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] != pytest.approx(math.log(2), abs=1e-4)
    assert result["before"]["kl"] == 0.0 and math.isfinite(result["after"]["kl"])
    assert result["held_out_pairs"]["reward_accuracy"] is not None


def test_lora_reference_is_the_untouched_base(make_model, tokenizer, tmp_path):
    model = make_model(0)
    original = copy.deepcopy(model)
    dpo(_config(tmp_path, method="lora", steps=5), model=model, tokenizer=tokenizer)
    # No second copy: the base weights are the reference, bit-identical after training.
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.tensor([tokenizer.encode("Which number is larger, 3 or 7? 7")])
    with torch.no_grad(), disabled_adapters(model):
        assert torch.equal(token_logprobs(model, ids), token_logprobs(original, ids))
    with torch.no_grad():
        policy_moved = not torch.allclose(token_logprobs(original, ids), token_logprobs(model, ids))
    assert policy_moved


def test_dpo_command_rejects_identical_pairs(model, tokenizer, tmp_path, capsys):
    save_model(model, tmp_path / "base", tokenizer=tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "4"}) + "\n")
    args = [
        "dpo",
        f"--model={tmp_path / 'base'}",
        f"--data.files=[{pairs}]",
        f"--out={tmp_path / 'o'}",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{pairs}:1" in err and "identical" in err
