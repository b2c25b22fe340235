"""The CLI end to end on a tiny corpus: tokenizer -> shards -> pretrain -> generate -> convert."""

import json

import pytest
import torch

import lmforge
from lmforge.cli import main

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Language models predict the next token from the previous ones. " * 3,
    "大语言模型的预训练需要大量高质量的数据。" * 3,
    "def add(a, b):\n    return a + b\n" * 3,
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    corpus = d / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(PARAGRAPHS[i % 4] + f" Document {i}.\n")
    assert (
        main(["tokenizer", "train", f"--input={corpus}", "--vocab_size=300", f"--out={d / 'tok'}"])
        == 0
    )
    assert (
        main(
            [
                "data",
                "tokenize",
                f"--input={corpus}",
                f"--tokenizer={d / 'tok'}",
                f"--out={d / 'shards'}",
                "--val_fraction=0.1",
            ]
        )
        == 0
    )
    args = [
        "pretrain",
        f"--data={d / 'shards'}",
        f"--out={d / 'run'}",
        "--model.vocab_size=320",
        "--model.d_model=32",
        "--model.n_layers=1",
        "--model.n_heads=2",
        "--model.max_seq_len=64",
        "--train.steps=6",
        "--train.batch_size=2",
        "--train.seq_len=32",
        "--train.eval_every=3",
        "--train.warmup_steps=1",
    ]
    assert main(args) == 0
    return d


def test_pipeline_writes_a_loadable_model(workdir, capsys):
    metrics = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert "val_loss" in metrics[2] and "val_loss" in metrics[5]
    model = lmforge.load(workdir / "run")
    tok = lmforge.load_tokenizer(workdir / "run")
    assert model.config.vocab_size == 320 and tok.vocab_size == 300
    assert (
        main(
            [
                "generate",
                f"--model={workdir / 'run'}",
                "--prompt=The quick",
                "--sampling.max_new_tokens=5",
                "--sampling.temperature=0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("The quick")


def test_convert_round_trip(workdir):
    hf, back = workdir / "hf", workdir / "back"
    assert main(["convert", f"--src={workdir / 'run'}", f"--dst={hf}", "--to=hf"]) == 0
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    assert main(["convert", f"--src={hf}", f"--dst={back}", "--to=lmforge"]) == 0
    x = torch.randint(0, 300, (1, 10))
    assert torch.equal(lmforge.load(workdir / "run")(x), lmforge.load(back)(x))


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_bad_inputs_get_one_clear_error(workdir, tmp_path, capsys):
    shards = workdir / "shards"
    assert (
        main(["pretrain", f"--data={shards}", "--model.vocab_size=100", f"--out={tmp_path / 'r'}"])
        == 1
    )
    err = _error(capsys)
    assert "vocabulary of" in err and "(300 tokens) does not fit the model" in err
    assert (
        main(
            [
                "pretrain",
                f"--data={shards}",
                "--model.vocab_size=320",
                "--model.max_seq_len=16",
                "--train.seq_len=32",
                f"--out={tmp_path / 'r'}",
            ]
        )
        == 1
    )
    assert "train.seq_len=32 exceeds the model's maximum" in _error(capsys)
    assert main(["tokenizer", "train", f"--input={tmp_path / 'nope'}"]) == 1
    assert "does not exist" in _error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert main(["tokenizer", "train", f"--input={empty}"]) == 1
    assert "empty" in _error(capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"hello \xff world")
    assert main(["tokenizer", "train", f"--input={bad}"]) == 1
    err = _error(capsys)
    assert "x.txt is not valid UTF-8" in err and "offset 6" in err
    assert main(["pretrain", "--model.dmodel=3"]) == 1
    assert "did you mean 'model.d_model'" in _error(capsys)
    assert main(["generate", f"--model={tmp_path}", "--prompt=hi"]) == 1
    assert "is not a model" in _error(capsys)
    long_prompt = "word " * 200
    assert main(["generate", f"--model={workdir / 'run'}", f"--prompt={long_prompt}"]) == 1
    assert "exceeds the model's max_seq_len 64" in _error(capsys)
    assert (
        main(
            [
                "data",
                "tokenize",
                f"--input={workdir / 'corpus'}",
                f"--tokenizer={workdir / 'tok'}",
                f"--out={workdir / 'shards'}",
            ]
        )
        == 1
    )
    assert "already exists" in _error(capsys)
    assert main(["frobnicate"]) == 2


def test_help_lists_fields(capsys):
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--train.grad_accum" in out and "--model.rope_theta" in out


def test_chat_repl_answers_and_keeps_history(workdir, monkeypatch, capsys):
    saved = workdir / "conversation.json"
    lines = iter(
        [
            "hello there",
            "",
            "/reset",
            "again",
            f"/save {saved}",
            "/system Be terse.",
            "third",
            "/nope",
            "/quit",
        ]
    )
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    from lmforge.infer.engine import Engine

    real_stream = Engine.stream

    def spy(engine, ids, params):
        seen.append((list(ids), params.stop_token_ids))
        yield from real_stream(engine, ids, params)

    monkeypatch.setattr(Engine, "stream", spy)
    args = [
        "chat",
        f"--model={workdir / 'run'}",
        "--system=Be brief.",
        "--sampling.max_new_tokens=4",
        "--sampling.seed=0",
    ]
    assert main(args) == 0
    tok = lmforge.load_tokenizer(workdir / "run")
    # Pre-training put BOS before every document, so a chat prompt starts with it too.
    first = tok.decode(seen[0][0]).removeprefix("<|bos|>")
    assert seen[0][0][0] == tok.bos_id
    assert first.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert first.endswith("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    assert tok.token_to_id("<|im_end|>") in seen[0][1]
    # After /reset only the system prompt and the new question remain.
    assert "hello there" not in tok.decode(seen[1][0]) and "again" in tok.decode(seen[1][0])
    conversation = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conversation] == ["system", "user", "assistant"]
    assert conversation[1]["content"] == "again"
    # /system replaces the system prompt and starts over.
    third = tok.decode(seen[2][0]).removeprefix("<|bos|>")
    assert third.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "again" not in third
    out = capsys.readouterr().out
    assert out.startswith("chat:") and "unknown command /nope" in out
    assert len(seen) == 3  # the empty line and the commands generated nothing
