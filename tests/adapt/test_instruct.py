"""Instruction data: templates, loss masks, truncation, packing, mixing and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.adapt.instruct import (
    Example,
    SFTData,
    encode_example,
    encode_examples,
    mix,
    mixing_rates,
    pack_batch,
    pad_batch,
    read_examples,
    render,
    sft_loss,
)
from lmforge.errors import ConfigError, CorpusError, LmforgeError
from lmforge.train.objectives import IGNORE_INDEX


def _examples(n: int) -> list[Example]:
    return [
        Example.from_instance(f"Add {i} and {i + 1}.", f"{i} + {i + 1} = {2 * i + 1}.")
        for i in range(n)
    ]


def test_ins_template_and_mask_cover_only_the_output(tokenizer):
    ex = Example.from_instance("Sort 3, 1.", "1, 3", input="numbers",
                               demonstrations=[{"instruction": "Sort 2, 1.", "output": "1, 2"}])  # fmt: skip
    segments = render(ex, "ins", tokenizer)
    eos = tokenizer.eos_token
    assert segments == [("[INS]Sort 2, 1.[INS]", False), ("1, 2" + eos, False),
                        ("[INS]Sort 3, 1.\nnumbers[INS]", False), ("1, 3" + eos, True)]  # fmt: skip
    enc = encode_example(ex, tokenizer, "ins", 128)
    targets = [t for t, m in zip(enc.tokens, enc.target) if m]
    assert targets == tokenizer.encode("1, 3") + [tokenizer.eos_id]
    # train_on_prompt: every token but the first (nothing predicts it) is a target.
    enc = encode_example(ex, tokenizer, "ins", 128, train_on_prompt=True)
    assert sum(enc.target) == len(enc.tokens) - 1


def test_chatml_and_alpaca_templates(tokenizer):
    ex = Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}])  # fmt: skip
    text = "".join(t for t, _ in render(ex, "chatml", tokenizer))
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")  # fmt: skip
    assert [t for t, m in render(ex, "chatml", tokenizer) if m] == ["Hello<|im_end|>"]
    alpaca = "".join(
        t for t, _ in render(Example.from_instance("Do X", "Y", "ctx"), "alpaca", tokenizer)
    )
    assert "### Instruction:\nDo X\n\n### Input:\nctx\n\n### Response:\nY" in alpaca


def test_readers_alpaca_sharegpt_messages_prompt_completion(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "I", "input": "", "output": "O"}]))
    rows = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "p", "completion": "c"},
    ]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_examples(alpaca)[0].messages[-1] == {"role": "assistant", "content": "O"}
    exs = read_examples(jsonl)
    assert [[m["role"] for m in e.messages] for e in exs] == [["user", "assistant"]] * 3
    assert exs[2].messages[1]["content"] == "c"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "x"}, r"lacks \['output'\]"),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            "roles out of order",
        ),  # fmt: skip
        ({"messages": [{"role": "user", "content": "q"}]}, "roles out of order"),
        ({"text": "x"}, "unrecognised example"),
    ],
)
def test_bad_examples_are_named(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(CorpusError, match=message) as e:
        read_examples(path)
    assert "bad.jsonl:1" in str(e.value)


def test_truncation_is_counted_and_never_drops_the_answer(tokenizer):
    long_prompt = Example.from_instance("word " * 100, "the answer")
    encoded, stats = encode_examples([long_prompt, *_examples(2)], tokenizer, "ins", 32)
    assert stats.examples == 3 and stats.truncated == 1 and stats.truncated_tokens > 0
    enc = encoded[0]
    assert len(enc.tokens) == 33 and not enc.target[0]
    assert [t for t, m in zip(enc.tokens, enc.target) if m] == tokenizer.encode("the answer") + [
        tokenizer.eos_id
    ]
    long_answer = Example.from_instance("q", "word " * 100)
    with pytest.raises(LmforgeError, match="output .* is longer than the sequence"):
        encode_examples([long_answer], tokenizer, "ins", 32)
    _, stats = encode_examples(
        [long_answer, *_examples(1)], tokenizer, "ins", 32, skip_too_long=True
    )
    assert stats.skipped == 1 and stats.examples == 1


def test_all_masked_batch_is_an_error_not_zero(model):
    x = torch.randint(0, 100, (2, 8))
    batch = {"input_ids": x, "labels": torch.full_like(x, IGNORE_INDEX)}
    with pytest.raises(LmforgeError, match="every target in this batch is masked"):
        sft_loss(model, batch)


def test_packed_loss_equals_unpacked_loss(model, tokenizer):
    encoded, _ = encode_examples(_examples(7), tokenizer, "ins", 64)
    packed = pack_batch(encoded, 64)
    assert packed["input_ids"].shape[0] < len(encoded)  # several examples share a row
    assert (packed["position_ids"][0, :3] == torch.arange(3)).all()
    padded = pad_batch(encoded, 64)
    # Reference: each example alone, no padding, loss summed over its targets.
    total, count = 0.0, 0
    for enc in encoded:
        x, y = torch.tensor(enc.tokens[:-1])[None], torch.tensor(
            [t if m else IGNORE_INDEX for t, m in zip(enc.tokens[1:], enc.target[1:])])[None]  # fmt: skip
        logits = model(x)
        total += F.cross_entropy(logits[0], y[0], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((y != IGNORE_INDEX).sum())
    with torch.no_grad():
        ref = total / count
        torch.testing.assert_close(sft_loss(model, packed), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(sft_loss(model, padded), ref, atol=1e-5, rtol=0)


def test_sft_data_batches_are_deterministic(tokenizer):
    encoded, _ = encode_examples(_examples(20), tokenizer, "ins", 64)
    data = SFTData(encoded, packing=True)
    a = data.get_batch(2, 64, seed=0, step=3)
    b = data.get_batch(2, 64, seed=0, step=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape == (2, 64)


def test_mixing_rates_and_realised_proportions():
    # Examples-proportional with a cap (T5): rates ∝ min(n, cap).
    assert mixing_rates({"a": 900, "b": 100}, cap=300) == pytest.approx({"a": 0.75, "b": 0.25})
    # Temperature T: rates ∝ n^(1/T).
    r = mixing_rates({"a": 900, "b": 100}, strategy="temperature", temperature=2.0)
    assert r == pytest.approx({"a": 30 / 40, "b": 10 / 40})
    data = {"a": _examples(90), "b": _examples(10)}
    out, report = mix(data, 200, cap=30, pretrain_texts=["plain text"], pretrain_ratio=0.1)
    assert len(out) == 200
    assert report["pretrain"]["examples"] == 20 and report["a"]["examples"] == 135
    assert report["b"]["realised"] == pytest.approx(45 / 200)
    assert sum(1 for e in out if e.messages[0]["role"] == "text") == 20
    with pytest.raises(ConfigError, match="pretrain_ratio"):
        mix(data, 10, pretrain_ratio=1.5, pretrain_texts=["x"])
