"""`lmforge eval` end to end on a tiny saved model: results.json, samples.jsonl, batch-size
invariance of the whole run, self-consistency voting and one-line errors."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.evaluation import harness, lm
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    tok = train_bpe(
        ["Question: How many apples? Answer: 8 #### 8. The sun rises in the east."] * 20, 300
    )
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, max_seq_len=1024)
    save_model(Transformer(config), d / "model", tokenizer=tok)
    (d / "text.txt").write_text("First paragraph of text.\n\nSecond paragraph, a little longer.\n")
    (d / "arith.yaml").write_text(
        "data: synthetic:arithmetic\nmax_gen_toks: 8\nextract: [strict, flexible]\n"
        "until: ['\\n\\n']\nmetadata: {synthetic: true}\n"
    )
    return d


def run_eval(model_dir, out, *extra):
    args = ["eval", "--model", str(model_dir / "model"), "--out", str(out), "--limit", "3", *extra]
    return main(args)


def test_eval_writes_results_and_samples(model_dir, tmp_path, capsys):
    tasks = f"{model_dir / 'arith.yaml'},reading_mc,cloze,{model_dir / 'text.txt'}"
    assert (
        run_eval(model_dir, tmp_path / "a", "--tasks", tasks, "--shots", "1", "--batch_size", "1")
        == 0
    )
    table = capsys.readouterr().out
    assert "reading_mc" in table and "acc_norm" in table and "word_perplexity" in table
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(results["results"]) == {"arith", "reading_mc", "cloze", "text"}
    mc = results["results"]["reading_mc"]
    assert mc["n"] == 3 and "acc_stderr" in mc and "acc_norm_stderr" in mc
    assert "exact_match,strict" in results["results"]["arith"]
    assert len(results["model"]["sha256"]) == 64 and len(results["prompts_sha256"]["all"]) == 64
    assert results["config"]["shots"] == 1 and results["tasks"]["arith"]["metadata"]["synthetic"]
    samples = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 3 + 2
    arith = next(s for s in samples if s["task"] == "arith")
    assert {"prompt", "generations", "extracted", "scores", "target"} <= set(arith)
    first = next(s for s in samples if s["task"] == "reading_mc")
    assert "咖啡店" in first["prompt"] and len(first["logliks"]) == 4
    # The mean in results.json is the mean of the per-item scores in samples.jsonl.
    accs = [s["scores"]["acc"] for s in samples if s["task"] == "reading_mc"]
    assert mc["acc"] == pytest.approx(sum(accs) / 3)

    # Batch size 16 and left padding give the same numbers and the same prompts.
    assert (
        run_eval(
            model_dir,
            tmp_path / "b",
            "--tasks",
            tasks,
            "--shots",
            "1",
            "--batch_size",
            "16",
            "--padding_side",
            "left",
        )
        == 0
    )
    other = json.loads((tmp_path / "b" / "results.json").read_text())
    assert other["prompts_sha256"] == results["prompts_sha256"]
    for task, res in results["results"].items():
        for key, value in res.items():
            if isinstance(value, float):
                assert other["results"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                    task,
                    key,
                )


def test_self_consistency_votes_over_samples(model_dir, tmp_path, monkeypatch):
    answers = iter(["so #### 7", "#### 8", "#### 7"])
    monkeypatch.setattr(
        lm, "generate_until", lambda m, t, prompts, **kw: [next(answers) for _ in prompts]
    )
    assert (
        run_eval(
            model_dir, tmp_path, "--tasks", "arithmetic", "--limit", "1", "--self_consistency", "3"
        )
        == 0
    )
    (sample,) = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sample["extracted"]["strict"] == {"votes": ["7", "8", "7"], "answer": "7"}


def test_bad_eval_input_is_one_line(model_dir, tmp_path, capsys):
    assert run_eval(model_dir, tmp_path, "--tasks", "nope_task") == 1
    assert "unknown task 'nope_task'" in capsys.readouterr().err
    assert run_eval(model_dir, tmp_path, "--tasks", "cloze", "--shots", "50") == 1
    assert "task cloze: asked for 50 demonstrations" in capsys.readouterr().err
    assert harness.format_table({}).startswith("task")
