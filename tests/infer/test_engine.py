"""The engine: slot cache vs full recomputation, continuous batching, prefix caching, per-request
sampling, stopping and streaming, bad input, threads."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.model.attention import SlotKVCache

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


class CharTokenizer:
    """One printable character per id."""

    eos_id: int | None = None

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("!") + i) for i in ids)


class RecordingModel(torch.nn.Module):
    """Passes calls through to a model and keeps every logits tensor it returned."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.inner, self.config, self.logits = model, model.config, []

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        self.logits.append(out.clone())
        return out


def greedy_by_recomputation(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference: run the whole sequence through the model without a cache at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [9], [60, 61, 62, 63, 64]]


def test_slot_batch_logits_match_full_recomputation(model: Transformer) -> None:
    # Three slots at lengths 7, 3 and 11 decode one token each in one forward pass.
    torch.manual_seed(1)
    seqs = [torch.randint(0, model.config.vocab_size, (n + 1,)) for n in (7, 3, 11)]
    cache = SlotKVCache(model.config, 4, 32)
    with torch.no_grad():
        for slot, s in enumerate(seqs):
            model(s[None, :-1], cache=cache.batch(slot, slot + 1))
        assert cache.lengths == [7, 3, 11, 0]
        step = model(torch.stack([s[-1:] for s in seqs]), cache=cache.batch(0, 3))
        for row, s in enumerate(seqs):
            torch.testing.assert_close(step[row, -1], model(s[None])[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.lengths == [8, 4, 12, 0]


def test_cache_is_allocated_once_within_the_stated_bound(model: Transformer) -> None:
    c = model.config
    engine = Engine(model, max_batch=3, max_context=40, prefix_cache_tokens=32, prefix_block=8)
    tensors = [engine.cache.k, engine.cache.v, engine.prefix_cache.k, engine.prefix_cache.v]
    before = [(t.data_ptr(), t.numel()) for t in tensors]
    per_position = c.n_layers * c.kv_heads * c.dim_head
    assert engine.cache.k.numel() == engine.cache.v.numel() == 3 * 40 * per_position
    assert engine.prefix_cache.k.numel() == 32 * per_position
    engine.generate([list(range(i, i + 20)) for i in range(5)], GREEDY)
    assert [(t.data_ptr(), t.numel()) for t in tensors] == before


def test_greedy_batch_of_different_lengths_matches_recomputation(model: Transformer) -> None:
    engine = Engine(model, max_batch=4)
    out = engine.generate(PROMPTS, GREEDY)
    assert [g.tokens for g in out] == [greedy_by_recomputation(model, p, 10) for p in PROMPTS]
    assert all(g.finish_reason == "length" and g.text is None for g in out)
    assert engine.stats.decode_steps == 9  # all four advance together, 10th token needs no step


def test_results_do_not_depend_on_batch_or_arrival(model: Transformer) -> None:
    # Different lengths of output too: a stop id ends some requests early, freeing slots.
    alone = [Engine(model, max_batch=1).generate([p], GREEDY)[0] for p in PROMPTS]
    stop = alone[0].tokens[3]
    params = dataclasses.replace(GREEDY, stop_token_ids=(stop,))
    alone = [Engine(model, max_batch=1).generate([p], params)[0] for p in PROMPTS]
    assert {g.finish_reason for g in alone} == {"stop", "length"}

    engine = Engine(model, max_batch=2)  # fewer slots than requests: the rest wait their turn
    first = [engine.submit(p, params) for p in PROMPTS[:3]]
    busy = []
    for _ in range(4):
        engine.step()
        busy.append(len(engine._active))
    late = engine.submit(PROMPTS[3], params)  # arrives while others are decoding
    engine.run()
    assert max(busy) == 2
    assert [r.generation for r in [*first, late]] == alone


def test_prefix_cache_reuses_blocks_and_matches_a_cold_run(model: Transformer) -> None:
    system = list(range(10, 30))  # 20 tokens: two full blocks of 8
    first, second = system + [1, 2, 3], system + [5, 6]
    warm = RecordingModel(model)
    engine = Engine(warm, max_batch=2, prefix_cache_tokens=64, prefix_block=8)
    engine.generate([first], GREEDY)
    assert (engine.stats.prefill_tokens, engine.stats.prefix_tokens_reused) == (23, 0)
    warm.logits.clear()
    hit = engine.generate([second], GREEDY)[0]
    assert (engine.stats.prefill_tokens, engine.stats.prefix_tokens_reused) == (23 + 6, 16)

    cold = RecordingModel(model)
    assert Engine(cold, prefix_cache_tokens=0).generate([second], GREEDY)[0] == hit
    assert hit.tokens == greedy_by_recomputation(model, second, 10)
    for a, b in zip(warm.logits, cold.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # A prompt that is entirely cached still computes its last token (its logits are needed).
    engine.generate([system[:16]], GREEDY)
    assert engine.stats.prefix_tokens_reused == 16 + 8


def test_prefix_cache_evicts_least_recently_used_within_budget(model: Transformer) -> None:
    engine = Engine(model, max_batch=1, prefix_cache_tokens=32, prefix_block=8)  # 4 blocks
    short = SamplingParams(max_new_tokens=1, temperature=0.0)
    prefixes = [[i] * 16 for i in (1, 2, 3)]  # two blocks each

    def reused(prompt: list[int]) -> int:
        before = engine.stats.prefix_tokens_reused
        engine.generate([prompt], short)
        assert engine.prefix_cache.tokens <= 32
        return engine.stats.prefix_tokens_reused - before

    assert reused(prefixes[0] + [5]) == 0
    assert reused(prefixes[1] + [5]) == 0
    assert reused(prefixes[0] + [6]) == 16  # a hit, which makes prefix 0 the most recent
    assert reused(prefixes[2] + [5]) == 0  # evicts prefix 1, the least recently used
    assert reused(prefixes[1] + [6]) == 0
    assert reused(prefixes[2] + [6]) == 16


def test_seeded_sampling_does_not_depend_on_the_batch(model: Transformer) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    alone = Engine(model).generate([[1, 2, 3]], params)[0].tokens
    assert Engine(model).generate([[1, 2, 3]], dataclasses.replace(params, seed=8))[0] != alone

    engine = Engine(model, max_batch=3)
    others = [
        engine.submit([4, 5, 6, 7], SamplingParams(max_new_tokens=5, temperature=2.0)),
        engine.submit([8], SamplingParams(max_new_tokens=20, temperature=0.0)),
    ]
    engine.step()
    engine.step()
    mine = engine.submit([1, 2, 3], params)
    others.append(
        engine.submit([9, 9], SamplingParams(temperature=1.0, top_k=5, repetition_penalty=1.3))
    )
    engine.run()
    assert mine.generation.tokens == alone
    assert all(r.finished for r in others)


def test_stop_strings_ids_length_and_streaming(model: Transformer) -> None:
    tokenizer = CharTokenizer()
    prompt = [1, 2, 3]
    full = Engine(model, tokenizer).generate([prompt], GREEDY)[0]
    assert full.text == tokenizer.decode(full.tokens) and full.finish_reason == "length"
    by_string = dataclasses.replace(GREEDY, stop_strings=(full.text[4:6],))
    by_id = dataclasses.replace(GREEDY, stop_token_ids=(full.tokens[3],))
    short = dataclasses.replace(GREEDY, max_new_tokens=3)

    engine = Engine(model, tokenizer, max_batch=3)
    pieces: dict[str, list[str]] = {"string": [], "id": [], "short": []}
    requests = {
        name: engine.submit(prompt, p, on_text=pieces[name].append)
        for name, p in zip(pieces, (by_string, by_id, short))
    }
    engine.run()
    cut = full.text.find(full.text[4:6])
    out = {name: r.generation for name, r in requests.items()}
    assert (out["string"].text, out["string"].finish_reason) == (full.text[:cut], "stop")
    assert out["string"].tokens == full.tokens[: cut + 2]
    stop_at = full.tokens.index(full.tokens[3])
    assert (out["id"].tokens, out["id"].finish_reason) == (full.tokens[:stop_at], "stop")
    assert (out["short"].tokens, out["short"].finish_reason) == (full.tokens[:3], "length")
    for name, g in out.items():
        assert "".join(pieces[name]) == g.text
    # One character per token, so streaming yields a piece per token until the stop string.
    assert len(pieces["short"]) == 3
    assert "".join(engine.stream(prompt, by_string)) == out["string"].text
    assert list(Engine(model).stream(prompt, short)) == full.tokens[:3]


def test_prompt_filling_the_context_gets_one_token(model: Transformer) -> None:
    engine = Engine(model, max_context=20)
    (out,) = engine.generate([[1] * 17], GREEDY)  # 20 - 17 + 1 = 4 tokens fit
    assert (len(out.tokens), out.finish_reason) == (4, "length")
    (out,) = engine.generate([[1] * 20], GREEDY)
    assert (len(out.tokens), out.finish_reason) == (1, "length")


def test_bad_input_errors(model: Transformer) -> None:
    engine = Engine(model, max_context=20)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match="prompt of 21 tokens .* max_context 20 .* max_seq_len 64"):
        engine.submit([1] * 21, GREEDY)
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        engine.submit([1, vocab], GREEDY)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        engine.submit([1], SamplingParams(stop_strings=("x",)))
    with pytest.raises(ValueError, match="on_text needs a tokenizer"):
        engine.submit([1], GREEDY, on_text=print)
    with pytest.raises(TypeError, match="params must be SamplingParams, got dict"):
        engine.submit([1], {"temperature": 0.0})
    with pytest.raises(ValueError, match="SamplingParams.top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[1]], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="max_context <= the model's max_seq_len 64"):
        Engine(model, max_context=65)
    # A batch with one bad prompt queues nothing.
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[1], []], GREEDY)
    assert not engine.has_work()


def test_submit_from_another_thread_while_run_loops(model: Transformer) -> None:
    tokenizer = CharTokenizer()
    long = SamplingParams(max_new_tokens=40, temperature=0.0)
    expected = [greedy_by_recomputation(model, p, 10) for p in PROMPTS]
    engine = Engine(model, tokenizer, max_batch=2)
    started = threading.Event()
    first = engine.submit([7, 8], long, on_text=lambda _: started.set())
    late: list = []

    def submitter() -> None:
        started.wait(timeout=30)
        late.extend(engine.submit(p, GREEDY) for p in PROMPTS)
        late[-1].wait(timeout=60)

    thread = threading.Thread(target=submitter)
    thread.start()
    engine.run()  # runs while the first request decodes, picking up what the thread submits
    thread.join(timeout=60)
    engine.run()  # in case the thread's submissions came after the loop went idle
    assert first.finished and not thread.is_alive()
    assert [r.generation.tokens for r in late] == expected
