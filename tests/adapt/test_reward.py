"""Reward model: the Bradley-Terry loss against its formula, the scalar read at the last real
token, a checkpoint that loads back, and a reward model for another tokenizer refused."""

import json
import math

import pytest
import torch

from lmforge.adapt.optimize import AlignTrainConfig
from lmforge.adapt.preference import PreferenceDataConfig
from lmforge.adapt.reward import (
    RewardConfig,
    RewardModel,
    check_tokenizer,
    load_reward_model,
    reward_command,
    reward_loss,
)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.heads import ScalarHead, last_token_values
from lmforge.tokenizer import train_bpe


def _log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


def test_bradley_terry_loss_formula():
    rc, rr = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    m, w, eta = torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 0.5, 0.25]), 0.01
    per = [-_log_sigmoid(rc[i] - rr[i] - m[i]) + eta * (rc[i] + rr[i]) ** 2 for i in range(3)]
    expected = sum(p * w[i] for i, p in enumerate(per)) / w.sum()
    got = reward_loss(rc, rr, margin=m, center_coef=eta, weight=w)
    assert got.item() == pytest.approx(float(expected), rel=1e-6)
    plain = reward_loss(rc, rr)
    assert plain.item() == pytest.approx(sum(-_log_sigmoid(rc[i] - rr[i]) for i in range(3)) / 3)


def test_reward_is_read_at_the_last_real_token(make_model):
    rm = RewardModel(make_model(0))
    torch.nn.init.normal_(rm.head.proj.weight)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    r = rm(ids, mask)
    # Right padding under causal attention: row 2's reward is that of the unpadded [5, 6].
    alone = rm(ids[1:, :2], mask[1:, :2])
    assert r[1].item() == pytest.approx(alone.item(), abs=1e-5)
    values = torch.arange(8.0).view(2, 4)
    assert last_token_values(values, mask).tolist() == [3.0, 5.0]
    assert ScalarHead(8)(torch.randn(2, 3, 8)).abs().sum() == 0  # a fresh head reads 0


def test_reward_command_trains_saves_and_loads(make_model, tokenizer, tmp_path):
    config = RewardConfig(
        model="tiny",
        out=str(tmp_path / "rm"),
        data=PreferenceDataConfig(tasks=["comparison"], per_task=12, eval_per_task=4, levels=[1]),
        train=AlignTrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=0),
    )
    result = reward_command(config, model=make_model(0), tokenizer=tokenizer)
    assert result["before"]["accuracy"] == 0.5  # a zero head ties every pair
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "rm/metrics.jsonl").read_text().splitlines()
    ]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    rm, tok, meta = load_reward_model(tmp_path / "rm/model")
    assert meta["template"] == "chatml" and tok.sha256 == tokenizer.sha256
    assert meta["eval_accuracy"] == result["after"]["accuracy"]
    assert rm.head.proj.weight.abs().sum() > 0
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path / "rm")  # the run directory, not out/model


def test_reward_model_for_another_tokenizer_is_refused(tokenizer):
    other = train_bpe(["completely different text about cats and dogs"] * 20, 300)
    with pytest.raises(ConfigError, match="another tokenizer"):
        check_tokenizer(tokenizer, other, "runs/rm/model")
    check_tokenizer(tokenizer, tokenizer, "runs/rm/model")
