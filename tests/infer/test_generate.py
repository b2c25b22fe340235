"""Generation: cached decoding vs full recomputation, batching, sampling, stopping, streaming."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmforge.infer.generate import (
    SamplingParams,
    apply_repetition_penalty,
    generate,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
)
from lmforge.model import KVCache, ModelConfig, Transformer

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


class CharTokenizer:
    """One printable character per id."""

    eos_id: int | None = None

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("!") + i) for i in ids)


class ByteTokenizer:
    """Ids are UTF-8 bytes, so one character may take several tokens."""

    eos_id: int | None = None

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class ScriptedModel(torch.nn.Module):
    """Continues any prompt of `prompt_len` tokens with the bytes of `script`."""

    def __init__(self, script: str, prompt_len: int) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=256, d_model=8, n_layers=1, n_heads=1, max_seq_len=64)
        self.script, self.prompt_len = script.encode(), prompt_len

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache, **_: object) -> torch.Tensor:
        B, T = input_ids.shape
        step = cache.length + T - self.prompt_len
        cache.advance(T)
        logits = torch.zeros(B, 1, 256)
        logits[:, :, self.script[step]] = 1.0
        return logits


def greedy_by_recomputation(model: Transformer, prompt: list[int], n: int, penalty: float = 1.0):
    """Reference: run the whole sequence through the model without a cache at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            for t in set(ids):  # CTRL penalty, written out token by token
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_cached_logits_match_full_recomputation(model: Transformer) -> None:
    # Left-padded batch: row 0 has 3 pads. Decode 5 tokens with the cache, compare every step.
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(2)
        steps = [model(ids[:, :7], attention_mask=mask[:, :7], cache=cache)]
        for t in range(7, 12):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)


def test_greedy_matches_full_recomputation(model: Transformer) -> None:
    for prompt in ([5], [3, 1, 4, 1, 5, 9, 2, 6]):
        (out,) = generate(model, [prompt], GREEDY)
        assert out.tokens == greedy_by_recomputation(model, prompt, 12)
        assert out.finish_reason == "length" and out.text is None


def test_repetition_penalty_greedy_matches_reference(model: Transformer) -> None:
    prompt = [7, 7, 8, 9]
    params = SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.8)
    (out,) = generate(model, [prompt], params)
    assert out.tokens == greedy_by_recomputation(model, prompt, 20, penalty=1.8)
    assert out.tokens != greedy_by_recomputation(model, prompt, 20)


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_batch_of_different_lengths_matches_each_prompt_alone(
    model: Transformer, penalty: float
) -> None:
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46], [9], [60, 61, 62, 63, 64]]
    # A stop token that ends some rows early exercises dropping finished rows from the batch.
    params = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=penalty)
    stop = generate(model, [prompts[0]], params)[0].tokens[3]
    params = dataclasses.replace(params, stop_token_ids=(stop,))
    alone = [generate(model, [p], params)[0] for p in prompts]
    assert any(g.finish_reason == "stop" for g in alone)
    assert any(g.finish_reason == "length" for g in alone)
    assert generate(model, prompts, params) == alone


def test_top_k_1_sampling_is_greedy(model: Transformer) -> None:
    prompts = [[1, 2, 3], [4, 5]]
    sampled = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1))
    assert [g.tokens for g in sampled] == [g.tokens for g in generate(model, prompts, GREEDY)]


def test_seed_makes_sampling_reproducible(model: Transformer) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=16, temperature=5.0, seed=seed)
        return generate(model, [[1, 2, 3]], params)[0].tokens

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_stop_token_ends_generation(model: Transformer) -> None:
    full = generate(model, [[1, 2, 3]], GREEDY)[0].tokens
    stop = full[4]
    cut = full[: full.index(stop)]
    (out,) = generate(model, [[1, 2, 3]], GREEDY, eos_id=stop)
    assert (out.tokens, out.finish_reason) == (cut, "stop")
    tokenizer = CharTokenizer()
    tokenizer.eos_id = stop  # eos_id defaults to the tokenizer's
    (out,) = generate(model, [[1, 2, 3]], GREEDY, tokenizer=tokenizer)
    assert (out.tokens, out.text, out.finish_reason) == (cut, tokenizer.decode(cut), "stop")


def test_stop_string_cuts_text(model: Transformer) -> None:
    tokenizer = CharTokenizer()
    full = generate(model, [[1, 2, 3]], GREEDY, tokenizer=tokenizer)[0]
    assert full.text == tokenizer.decode(full.tokens)
    stop = full.text[5:7]
    at = full.text.find(stop)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=("~~~~", stop))
    (out,) = generate(model, [[1, 2, 3]], params, tokenizer=tokenizer)
    assert out.finish_reason == "stop"
    assert out.text == full.text[:at]
    # One character per token: the tokens run up to the one completing the stop string.
    assert out.tokens == full.tokens[: at + len(stop)]


def test_stream_yields_what_generate_returns(model: Transformer) -> None:
    prompt, tokenizer = [1, 2, 3], CharTokenizer()
    assert list(stream(model, prompt, GREEDY)) == generate(model, [prompt], GREEDY)[0].tokens
    full = generate(model, [prompt], GREEDY, tokenizer=tokenizer)[0].text
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=(full[6:9],))
    out = generate(model, [prompt], params, tokenizer=tokenizer)[0]
    assert "".join(stream(model, prompt, params, tokenizer=tokenizer)) == out.text


def test_stream_holds_back_split_characters_and_stop_string_starts() -> None:
    # "€" is three UTF-8 bytes, so three tokens; "ST" might start the stop string "STOP".
    model = ScriptedModel("aST€ STOP and more", prompt_len=2)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop_strings=("STOP",))
    pieces = list(stream(model, [1, 2], params, tokenizer=ByteTokenizer()))
    assert pieces == ["a", "ST€", " "]
    (out,) = generate(model, [[1, 2]], params, tokenizer=ByteTokenizer())
    assert (out.text, out.finish_reason) == ("aST€ ", "stop")
    assert out.tokens == list("aST€ STOP".encode())


def test_length_limit_and_too_long_prompt(model: Transformer) -> None:
    limit = model.config.max_seq_len
    # The last new token is never fed back: a prompt of limit - 4 tokens leaves room for 5.
    (out,) = generate(model, [[1] * (limit - 4)], SamplingParams(temperature=0.0))
    assert (len(out.tokens), out.finish_reason) == (5, "length")
    with pytest.raises(ValueError, match=rf"prompt of {limit + 1} tokens .* max_seq_len {limit}"):
        generate(model, [[1, 2], [1] * (limit + 1)], GREEDY)


def test_bad_input_errors(model: Transformer) -> None:
    assert generate(model, [], GREEDY) == []
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1], []], GREEDY)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        generate(model, [[1]], SamplingParams(stop_strings=("x",)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("temperature", -0.5),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("stop_strings", ("",)),
    ],
)
def test_invalid_sampling_params(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**{field: value})


def test_repetition_penalty_formula() -> None:
    torch.manual_seed(0)
    logits, seen = torch.randn(3, 20), torch.rand(3, 20) < 0.4
    got = apply_repetition_penalty(logits, seen, 1.3)
    for i in range(3):
        for j in range(20):
            x = logits[i, j].item()
            want = (x / 1.3 if x > 0 else x * 1.3) if seen[i, j] else x
            assert math.isclose(got[i, j].item(), want, rel_tol=1e-6)


def test_top_k_filter_keeps_the_k_largest() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    kept = top_k_filter(logits, 5).isfinite()
    assert kept.sum(-1).tolist() == [5] * 4
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, logits.topk(5).indices, True))
    assert torch.equal(top_k_filter(logits, 0), logits)


def brute_force_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        probs = logits[row].double().softmax(-1).tolist()
        total = 0.0
        for j in sorted(range(len(probs)), key=lambda j: -probs[j]):
            out[row, j] = logits[row, j]
            total += probs[j]
            if total >= p:
                break
    return out


@pytest.mark.parametrize("seed", range(20))
def test_top_p_filter_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=gen) * (0.5 + 3 * torch.rand(1, generator=gen))
    p = 0.05 + 0.95 * torch.rand(1, generator=gen).item()
    assert torch.equal(top_p_filter(logits, p), brute_force_top_p(logits, p))


def test_top_p_always_keeps_the_most_probable_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert top_p_filter(logits, 1e-9).isfinite().tolist() == [[False, True, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sample_next_respects_filters() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 40)
    greedy = sample_next(logits, SamplingParams(temperature=0.0))
    assert torch.equal(greedy, logits.argmax(-1))
    gen = torch.Generator().manual_seed(0)
    allowed = logits.topk(3).indices
    for _ in range(50):
        token = sample_next(logits, SamplingParams(top_k=3), gen)
        assert (allowed == token[:, None]).any(-1).all()
