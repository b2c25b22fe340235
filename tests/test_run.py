"""`lmforge run`: the main job end to end (tiny settings; the full default run is `slow`)."""

import json
import math
import time

import pytest

from lmforge.cli import main


def test_run_on_user_data_writes_report(tmp_path):
    data = tmp_path / "texts.jsonl"
    lines = [
        json.dumps({"text": f"Sentence number {i} says hello to the world. " * 4})
        for i in range(60)
    ]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = [
        "run",
        f"--data={data}",
        f"--out={out}",
        "--vocab_size=300",
        "--model.d_model=32",
        "--model.n_layers=1",
        "--model.n_heads=2",
        "--model.n_kv_heads=1",
        "--train.steps=30",
        "--train.batch_size=4",
        "--train.seq_len=32",
        "--train.lr=1e-2",
        "--train.warmup_steps=5",
        "--train.eval_every=10",
        "--train.save_every=0",
        "--train.compile=false",
        "--sample_tokens=8",
        "--prompts=[Sentence]",
        '--chat_questions=["What is the capital of France?"]',
        "--chat_tokens=8",
        "--sft_steps=20",
        "--sft_eval_items=4",
    ]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "loss.png").stat().st_size > 1000
    for key in [
        "parameters (total / non-embedding)",
        "tokens seen",
        "throughput (tokens/s)",
        "final validation loss",
        "unigram entropy",
        "## Samples",
        "Sentence",
        "instruction tuning exact match before → after (held-out, n=4)",
        "alignment exact match before → after",
        "alignment KL to the SFT model (nats/response)",
    ]:
        assert key in report
    assert summary["tokens_seen"] == 30 * 4 * 32
    # The released chat model (installed by the Makefile) answers in its own section.
    assert "## Chat — smollm2" in report and "The capital of France is Paris" in report
    # A repetitive corpus: even this tiny model must beat the context-free baseline.
    assert summary["final_val_loss"] < summary["unigram_entropy"]
    # The quantization stage: int8 and int4 copies, smaller on disk, perplexity close to fp32's
    # (which is the trainer's own validation loss, scored on the same windows).
    quant = summary["quantization"]
    assert set(quant) == {"fp32", "int8 RTN per-channel", "int4 RTN g32"}
    fp32, int8, int4 = quant.values()
    assert fp32["val_perplexity"] == pytest.approx(math.exp(summary["final_val_loss"]), rel=1e-3)
    assert int8["val_perplexity"] == pytest.approx(fp32["val_perplexity"], rel=0.02)
    assert int4["val_perplexity"] == pytest.approx(fp32["val_perplexity"], rel=0.3)
    assert fp32["size_bytes"] > int8["size_bytes"] > int4["size_bytes"]
    assert all(r["decode_tokens_per_s"] > 0 for r in quant.values())
    assert "quantization int4 RTN g32: size MB / decode tok/s / val perplexity" in report
    assert (out / "quantized" / "int4" / "quantization.yaml").exists()


@pytest.mark.slow
def test_default_run_beats_unigram_entropy_in_five_minutes(tmp_path):
    start = time.perf_counter()
    assert main(["run", f"--out={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert time.perf_counter() - start < 300
    assert summary["final_val_loss"] < summary["unigram_entropy"] - 1.0
