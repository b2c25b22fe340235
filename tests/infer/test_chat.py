"""ChatSession: template rendering, stop tokens, context-window trimming, saving; REPL errors."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.chat import ChatSession, end_of_turn_ids, repl
from lmforge.infer.generate import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["hello world, how are you today?"] * 30, 300, min_frequency=1)


def session(tokenizer, max_seq_len=64, max_new_tokens=4, system="Be brief."):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            d_model=32,
            n_layers=1,
            n_heads=2,
            max_seq_len=max_seq_len,
        )
    ).eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    return ChatSession(model, tokenizer, params, system=system)


def test_stops_at_end_of_turn_and_eos(tokenizer):
    chat = session(tokenizer)
    ids = set(end_of_turn_ids(tokenizer))
    assert {tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_id} <= ids
    assert ids <= set(chat.params.stop_token_ids)


def test_history_is_rendered_and_saved(tokenizer, tmp_path):
    chat = session(tokenizer, max_seq_len=256)
    first = chat.ask("hello")
    chat.ask("how are you")
    assert [m["role"] for m in chat.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert chat.messages[2]["content"] == first
    text = tokenizer.decode(chat.prompt_ids())
    assert "hello" in text and "how are you" in text and text.endswith("<|im_start|>assistant\n")
    saved = json.loads(chat.save(tmp_path / "c.json").read_text())
    assert saved["messages"] == chat.messages


def test_oldest_exchanges_are_dropped_to_fit_the_window(tokenizer):
    chat = session(tokenizer, max_seq_len=60, max_new_tokens=4)
    for _ in range(4):
        chat.ask("hello world how are you")
    assert chat.dropped_turns > 0
    assert len(chat.prompt_ids()) <= 60 - 4
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}


def test_each_turn_reuses_the_cached_conversation(tokenizer):
    chat = session(tokenizer, max_seq_len=256)
    chat.ask("hello world")
    first = chat.engine.stats.prefill_tokens
    chat.ask("how are you today")
    stats = chat.engine.stats
    # The second prompt starts with the first one (system, question, answer): only whole
    # 16-token blocks past the cached part are recomputed.
    assert stats.prefix_tokens_reused >= 16 * ((first - 1) // 16)
    assert stats.prefill_tokens - first < len(chat.prompt_ids()) - 16


def test_message_longer_than_the_context_is_an_error(tokenizer):
    chat = session(tokenizer, max_seq_len=24)
    with pytest.raises(LmforgeError, match="more than the chat's context of 24"):
        chat.ask("hello world " * 20)
    assert chat.turns == []  # the failed message does not stay in the history


def test_repl_reports_errors_and_goes_on(tokenizer):
    chat = session(tokenizer, max_seq_len=24)
    lines = iter(["hello world " * 20, "/system", "hi", "/save", "/help"])
    out = []

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    repl(chat, read, out.append)
    text = "".join(out)
    assert "error: the message needs" in text and "usage: /save PATH" in text
    assert "/system TEXT" in text and chat.system == "" and len(chat.turns) == 2
