"""Best-of-n rejection-sampling fine-tuning: the kept responses are each prompt's best, and SFT
on them runs through `lmforge sft`."""

import json

import pytest

from lmforge.adapt.preference import verifiable_prompts
from lmforge.adapt.rejection import RejectionConfig, rejection
from lmforge.adapt.sft import SFTConfig, sft
from lmforge.errors import LmforgeError
from lmforge.train.trainer import TrainConfig


def _config(tmp_path, **kw) -> RejectionConfig:
    train = TrainConfig(
        steps=3,
        batch_size=2,
        seq_len=96,
        lr=1e-3,
        warmup_steps=0,
        eval_every=0,
        save_every=0,
        resume=False,
    )
    return RejectionConfig(
        model="tiny",
        out=str(tmp_path / "rs"),
        levels=[1],
        prompts_per_task=6,
        n=3,
        max_new_tokens=4,
        eval_items=2,
        kl_samples=4,
        train=train,
        **kw,
    )


def answering_model(model, tokenizer, tmp_path):
    """The tiny model after 20 SFT steps: it answers in a few tokens and stops (an untrained
    model never ends a response, and unfinished responses are never kept)."""
    sft_config = SFTConfig(
        model="tiny",
        out=str(tmp_path / "sft"),
        method="full",
        synthetic_tasks=["comparison"],
        synthetic_per_task=20,
        languages=["en"],
        levels=[1],
        rationale=False,
        eval_items=0,
        train=TrainConfig(
            steps=20,
            batch_size=8,
            seq_len=64,
            lr=1e-2,
            warmup_steps=0,
            weight_decay=0.0,
            eval_every=0,
            save_every=0,
        ),
    )
    sft(sft_config, model=model, tokenizer=tokenizer)
    return model.eval()


def test_keeps_the_best_sample_and_fine_tunes_on_it(make_model, tokenizer, tmp_path):
    # min_reward 0 keeps every prompt's best finished response (ties: the first sample).
    model = answering_model(make_model(0), tokenizer, tmp_path)
    result = rejection(_config(tmp_path, min_reward=0.0), model=model, tokenizer=tokenizer)
    kept = [json.loads(x) for x in (tmp_path / "rs/best.jsonl").read_text().splitlines()]
    assert result["kept"] == len(kept) > 0 and result["steps"] == 3
    prompts = {p.prompt for p in verifiable_prompts(["comparison"], 6, split="train", levels=(1,))}
    assert {k["prompt"] for k in kept} <= prompts
    samples = [json.loads(x) for x in (tmp_path / "rs/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 3
    for k in kept:  # the kept response is the best of its prompt's samples
        scores = [s["reward"] for s in samples if s["prompt"] == k["prompt"]]
        assert k["reward"] == max(scores)
    assert (tmp_path / "rs/sft/model/adapter.yaml").exists()  # LoRA by default
    assert result["mean_best_score"] >= result["mean_sample_score"]


def test_nothing_good_enough_is_an_error(make_model, tokenizer, tmp_path):
    with pytest.raises(LmforgeError, match="min_reward 1.0"):
        rejection(_config(tmp_path, min_reward=1.0), model=make_model(0), tokenizer=tokenizer)
