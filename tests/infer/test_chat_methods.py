"""Prompting methods in the chat session and REPL: /cot, /sc, /tools."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.chat import ChatSession, repl, with_methods
from lmforge.infer.generate import SamplingParams
from lmforge.infer.tools import CALCULATOR
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["hello world, how are you today? 1 2 3 4"] * 30, 300, min_frequency=1)


def session(tokenizer, **methods):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_seq_len=2048,
        init_std=0.3,
    )
    params = SamplingParams(max_new_tokens=5, temperature=0, seed=1)
    return ChatSession(Transformer(config).eval(), tokenizer, params, **methods)


def test_with_methods_places_demos_tools_and_trigger():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q?"}]
    out, cont = with_methods(
        messages, demos=[("d?", "a.")], tools=[CALCULATOR], zero_shot_cot=True, continuation="x"
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and "<calc>" in out[0]["content"]
    assert out[1:3] == [{"role": "user", "content": "d?"}, {"role": "assistant", "content": "a."}]
    assert cont == "Let's think step by step. x"
    assert messages[0]["content"] == "Be brief."  # the input is not modified


def test_zero_shot_cot_opens_the_answer(tokenizer):
    chat = session(tokenizer, cot="zeroshot")
    chat.turns.append({"role": "user", "content": "hello"})
    assert tokenizer.decode(chat.prompt_ids()).endswith(
        "<|im_start|>assistant\nLet's think step by step."
    )


def test_repl_switches_methods_and_reports_votes(tokenizer):
    chat = session(tokenizer)
    lines = iter(
        [
            "/cot fewshot",
            "/sc 3",
            "/tools calculator",
            "/tools retrieval",
            "/cot maybe",
            "hello",
            "/quit",
        ]
    )
    out = []
    repl(chat, read=lambda _: next(lines), write=out.append)
    text = "".join(out)
    assert "(chain-of-thought: fewshot)" in text and "(self-consistency: 3 samples)" in text
    assert "(tools: calculator)" in text
    assert "error: the retrieval tool needs a folder" in text
    assert "error: usage: /cot" in text
    assert "(self-consistency: answer" in text and "of 3 votes" in text
    assert chat.engine.max_batch >= 3 and chat.tools == [CALCULATOR]
    assert len(chat.last_info["self_consistency"]["answers"]) == 3
    # The few-shot exemplars (with calculator calls) were in the prompt of the reply.
    assert chat.engine.stats.prefill_tokens > 300
