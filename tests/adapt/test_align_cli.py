"""`lmforge reward | dpo | ppo | rejection` on lmforge checkpoints from the command line."""

import json

import pytest

from lmforge.adapt.peft import load_adapter
from lmforge.cli import main
from lmforge.loading import load
from lmforge.train.checkpoint import save_model

SMALL = [
    "--data.tasks=[comparison]",
    "--data.per_task=6",
    "--data.eval_per_task=2",
    "--data.levels=[1]",
    "--train.steps=2",
    "--train.batch_size=2",
]
RUNS = [
    "--levels=[1]",
    "--prompts_per_task=4",
    "--max_new_tokens=3",
    "--eval_items=1",
    "--kl_samples=2",
    "--train.steps=2",
    "--train.batch_size=2",
]


@pytest.mark.parametrize("command", ["reward", "dpo", "ppo", "rejection"])
def test_help_lists_the_fields(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--train.lr" in out


def test_commands_on_a_checkpoint(model, tokenizer, tmp_path):
    save_model(model, tmp_path / "init", tokenizer=tokenizer)
    # A few SFT steps, so that the policy finishes its answers (rejection keeps only those).
    sft = [
        "sft",
        f"--model={tmp_path / 'init'}",
        f"--out={tmp_path / 'sft'}",
        "--method=full",
        "--synthetic_tasks=[comparison]",
        "--synthetic_per_task=20",
        "--languages=[en]",
        "--levels=[1]",
        "--rationale=false",
        "--eval_items=0",
        "--train.steps=20",
        "--train.batch_size=8",
        "--train.seq_len=64",
        "--train.lr=1e-2",
        "--train.warmup_steps=0",
        "--train.weight_decay=0",
        "--train.save_every=0",
        "--train.eval_every=0",
    ]
    assert main(sft) == 0
    base = tmp_path / "sft" / "model"
    rm = tmp_path / "rm"
    assert main(["reward", f"--model={base}", f"--out={rm}", *SMALL]) == 0
    assert json.loads((rm / "reward.json").read_text())["after"]["accuracy"] is not None
    dpo = tmp_path / "dpo"
    assert (
        main(
            [
                "dpo",
                f"--model={base}",
                f"--out={dpo}",
                "--method=lora",
                "--eval_items=1",
                "--kl_samples=2",
                *SMALL,
            ]
        )
        == 0
    )
    tuned = load(dpo / "model")
    load_adapter(tuned, dpo / "model")  # a LoRA policy: the base plus its adapter
    ppo = tmp_path / "ppo"
    args = [
        "ppo",
        f"--model={base}",
        f"--out={ppo}",
        "--algo=grpo",
        "--group=2",
        "--reward=model",
        f"--reward_model={rm / 'model'}",
        *RUNS,
    ]
    assert main(args) == 0
    assert json.loads((ppo / "ppo.json").read_text())["algo"] == "grpo"
    rs = tmp_path / "rs"
    args = [
        "rejection",
        f"--model={base}",
        f"--out={rs}",
        "--n=3",
        "--min_reward=-1000",
        "--reward=model",
        f"--reward_model={rm / 'model'}",
        "--method=full",
        *RUNS,
        "--train.seq_len=96",
    ]
    assert main(args) == 0
    assert (rs / "sft/model/model.safetensors").exists()


def test_ppo_without_a_reward_model_path_is_an_error(model, tokenizer, tmp_path, capsys):
    save_model(model, tmp_path / "base", tokenizer=tokenizer)
    assert main(["ppo", f"--model={tmp_path / 'base'}", "--reward=model"]) == 1
    assert "--reward_model" in capsys.readouterr().err
