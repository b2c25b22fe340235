"""Alignment moves a model toward what the reward prefers (slow: a few minutes on 2 CPU cores).

The start is a small model instruction-tuned on imperfect demonstrations of the bundled
comparison task: half its answers wrapped in rambling (which fails exact match) and half the
listed harmful requests complied with. Each method must raise held-out exact match (200 items)
by more than MARGIN, above the largest seed-to-seed standard deviation of the methods in
docs/align.md (0.028 over 3 seeds), with the KL to the SFT model bounded; the reward model must
rank > 0.9 of held-out pairs right. Seed 0 of docs/align.md's table is what runs here.
"""

import copy
import json

import pytest
import torch

from lmforge.adapt.dpo import DPOConfig, dpo
from lmforge.adapt.optimize import AlignTrainConfig
from lmforge.adapt.ppo import PPOConfig, ppo
from lmforge.adapt.preference import PreferenceDataConfig, demonstrations, verifiable_pairs
from lmforge.adapt.rejection import RejectionConfig, rejection
from lmforge.adapt.reward import RewardConfig, reward_command
from lmforge.adapt.sft import SFTConfig, sft
from lmforge.model import ModelConfig, Transformer
from lmforge.train.trainer import TrainConfig

pytestmark = pytest.mark.slow
MARGIN = 0.05
KL_BOUND = 5.0  # nats per response
EVAL = dict(eval_items=200, eval_harmful=28, kl_samples=64, max_new_tokens=8)
DATA = PreferenceDataConfig(tasks=["comparison"], levels=[1], per_task=400, eval_per_task=50)


@pytest.fixture(scope="module")
def sft_model(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("imperfect_sft")
    pairs = verifiable_pairs(
        ["comparison"], 400, split="train", kinds=["concise", "refusal"], levels=(1,)
    )
    data = out / "demonstrations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demonstrations(pairs, 0.5)))
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=384,
            d_model=128,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=128,
            mlp="swiglu",
            position="rope",
            norm="rmsnorm",
        )
    )
    config = SFTConfig(
        model="tiny",
        out=str(out / "sft"),
        method="full",
        data=[str(data)],
        eval_items=0,
        packing=True,
        train=TrainConfig(
            steps=400,
            batch_size=16,
            seq_len=128,
            lr=3e-3,
            warmup_steps=10,
            weight_decay=0.0,
            eval_every=0,
            save_every=0,
        ),
    )
    sft(config, model=model, tokenizer=tokenizer)
    return model.eval()


def _check(result):
    before, after = result["before"], result["after"]
    assert after["exact_match"] - before["exact_match"] > MARGIN, (before, after)
    assert 0 <= after["kl"] < KL_BOUND


def test_reward_model_ranks_held_out_pairs(sft_model, tokenizer, tmp_path):
    config = RewardConfig(
        model="sft",
        out=str(tmp_path / "rm"),
        data=DATA,
        train=AlignTrainConfig(steps=400, batch_size=16, lr=3e-4),
    )
    result = reward_command(config, model=copy.deepcopy(sft_model), tokenizer=tokenizer)
    assert result["after"]["accuracy"] > 0.9
    assert result["after"]["accuracy_by_kind"]["concise"] > 0.95


def test_dpo_raises_exact_match(sft_model, tokenizer, tmp_path):
    config = DPOConfig(
        model="sft",
        out=str(tmp_path / "dpo"),
        method="full",
        data=DATA,
        beta=0.5,
        train=AlignTrainConfig(steps=100, batch_size=16, lr=3e-5),
        **EVAL,
    )
    _check(dpo(config, model=copy.deepcopy(sft_model), tokenizer=tokenizer))


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ppo_and_grpo_raise_exact_match(sft_model, tokenizer, tmp_path, algo):
    config = PPOConfig(
        model="sft",
        out=str(tmp_path / algo),
        algo=algo,
        method="full",
        levels=[1],
        harmful=68,
        **EVAL,
        train=AlignTrainConfig(
            steps=20, batch_size=16, lr=3e-5, warmup_steps=0, schedule="constant"
        ),
    )
    _check(ppo(config, model=copy.deepcopy(sft_model), tokenizer=tokenizer))


def test_rejection_sampling_raises_exact_match(sft_model, tokenizer, tmp_path):
    config = RejectionConfig(
        model="sft",
        out=str(tmp_path / "rs"),
        method="full",
        levels=[1],
        harmful=68,
        prompts_per_task=200,
        n=4,
        **EVAL,
        train=TrainConfig(
            steps=60,
            batch_size=16,
            seq_len=64,
            lr=1e-4,
            warmup_steps=5,
            weight_decay=0.0,
            eval_every=0,
            save_every=0,
            resume=False,
        ),
    )
    _check(rejection(config, model=copy.deepcopy(sft_model), tokenizer=tokenizer))
