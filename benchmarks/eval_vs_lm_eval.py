"""lmforge's evaluation harness against lm-evaluation-harness on the same model, data and prompts.

Needs a separate venv with lm-eval (see docs/evaluation.md):
    /work/lmeval-venv/bin/python benchmarks/eval_vs_lm_eval.py [--items 60] [--batch-size 8]
Builds a random-weight Llama-style model with a BPE tokenizer trained on Python's own docs, saves it
in Hugging Face format, writes a multiple-choice JSONL and a perplexity JSONL, runs both harnesses
and prints acc / acc_norm / perplexities side by side, the largest per-request log-likelihood
difference and the wall time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

MC_PROMPT = "Question: {{question}}\nAnswer:"


def make_model(out: Path, seq_len: int) -> Path:
    import pydoc_data.topics

    from lmforge.data.synthetic import generate
    from lmforge.interop.hf import export_hf
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import train_bpe

    texts = list(pydoc_data.topics.topics.values())[:60]
    texts += [it.question + " " + it.solution for it in generate("comparison", 200, split="train")]
    tokenizer = train_bpe(texts, 1024)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=1024,
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=seq_len,
        mlp="swiglu",
        position="rope",
        norm="rmsnorm",
    )
    model = Transformer(config)
    with torch.no_grad():  # larger logits than the default init, so choices are not near-ties
        model.lm_head.weight.mul_(4.0)
    return export_hf(model, out / "hf", tokenizer=tokenizer)


def make_data(out: Path, items: int) -> tuple[Path, Path]:
    import json as _json
    import pydoc_data.topics

    from lmforge.data.synthetic import generate
    from lmforge.evaluation.tasks import BUNDLED_DIR

    mc = out / "mc.jsonl"
    rows = []
    for it in generate("comparison", items, split="test"):
        a, b = (int(x) for x in it.question.rstrip("?").split("larger, ")[1].split(" or "))
        rows.append(
            {
                "question": it.question,
                "choices": [str(a), str(b)],
                "answer": [a, b].index(int(it.answer)),
            }
        )
    for line in (BUNDLED_DIR / "reading_mc.jsonl").read_text().splitlines():
        doc = _json.loads(line)
        rows.append(
            {
                "question": doc["passage"] + " " + doc["question"],
                "choices": doc["choices"],
                "answer": doc["answer"],
            }
        )
    mc.write_text("".join(_json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ppl = out / "ppl.jsonl"
    texts = list(pydoc_data.topics.topics.values())[60 : 60 + max(4, items // 5)]
    ppl.write_text("".join(_json.dumps({"text": t[:3000]}) + "\n" for t in texts))
    return mc, ppl


def lm_eval_tasks(out: Path, mc: Path, ppl: Path) -> Path:
    tasks = out / "lm_eval_tasks"
    tasks.mkdir()
    (tasks / "lmf_mc.yaml").write_text(
        "task: lmf_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        f'doc_to_text: "{MC_PROMPT.replace(chr(10), chr(92) + "n")}"\n'
        "doc_to_target: answer\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tasks / "lmf_ppl.yaml").write_text(
        "task: lmf_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {ppl}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    return tasks


def run_lm_eval(hf: Path, tasks: Path, batch_size: int) -> tuple[dict, dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf},dtype=float32",
        tasks=["lmf_mc", "lmf_ppl"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )
    seconds = time.perf_counter() - start
    r = out["results"]
    metrics = {
        "acc": r["lmf_mc"]["acc,none"],
        "acc_norm": r["lmf_mc"]["acc_norm,none"],
        "word_perplexity": r["lmf_ppl"]["word_perplexity,none"],
        "byte_perplexity": r["lmf_ppl"]["byte_perplexity,none"],
        "bits_per_byte": r["lmf_ppl"]["bits_per_byte,none"],
    }
    logliks = {
        "mc": [
            [float(x[0][0]) for x in s["resps"]]
            for s in sorted(out["samples"]["lmf_mc"], key=lambda s: s["doc_id"])
        ],
        "ppl": [
            float(s["resps"][0][0])
            for s in sorted(out["samples"]["lmf_ppl"], key=lambda s: s["doc_id"])
        ],
    }
    return metrics, logliks, seconds


def run_lmforge(hf: Path, mc: Path, ppl: Path, batch_size: int) -> tuple[dict, dict, float]:
    import lmforge
    from lmforge.evaluation.harness import EvalConfig, evaluate
    from lmforge.evaluation.tasks import TaskConfig

    start = time.perf_counter()
    model, tokenizer = lmforge.load(hf), lmforge.load_tokenizer(hf)
    tasks = [
        TaskConfig(
            name="lmf_mc", data=str(mc), output_type="multiple_choice", doc_to_text=MC_PROMPT
        ),
        TaskConfig(
            name="lmf_ppl",
            data=str(ppl),
            output_type="loglikelihood_rolling",
            doc_to_text="{{text}}",
            metrics=["word_perplexity", "byte_perplexity", "bits_per_byte"],
        ),
    ]
    ev = evaluate(model, tokenizer, tasks, EvalConfig(batch_size=batch_size))
    seconds = time.perf_counter() - start
    r = ev["results"]
    metrics = {k: r["lmf_mc"][k] for k in ("acc", "acc_norm")}
    metrics.update(
        {k: r["lmf_ppl"][k] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    )
    logliks = {
        "mc": [s["logliks"] for s in ev["samples"] if s["task"] == "lmf_mc"],
        "ppl": [s["loglik"] for s in ev["samples"] if s["task"] == "lmf_ppl"],
    }
    return metrics, logliks, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        hf = make_model(out, args.seq_len)
        mc, ppl = make_data(out, args.items)
        tasks = lm_eval_tasks(out, mc, ppl)
        ours, our_ll, our_s = run_lmforge(hf, mc, ppl, args.batch_size)
        theirs, their_ll, their_s = run_lm_eval(hf, tasks, args.batch_size)
    n_mc = len(our_ll["mc"])
    print(
        f"\n{n_mc} multiple-choice items, {len(our_ll['ppl'])} perplexity documents, batch {args.batch_size}"
    )
    print(f"{'metric':<18}{'lmforge':>16}{'lm-eval':>16}{'rel diff':>12}")
    for k in ours:
        rel = abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12)
        print(f"{k:<18}{ours[k]:>16.8g}{theirs[k]:>16.8g}{rel:>12.2e}")
    mc_diff = max(abs(a - b) for x, y in zip(our_ll["mc"], their_ll["mc"]) for a, b in zip(x, y))
    ppl_rel = max(abs(a - b) / abs(b) for a, b in zip(our_ll["ppl"], their_ll["ppl"]))
    print(
        f"max |loglik diff| per choice: {mc_diff:.2e}; max relative diff per document: {ppl_rel:.2e}"
    )
    exact = ours["acc"] == theirs["acc"] and ours["acc_norm"] == theirs["acc_norm"]
    print(f"acc and acc_norm identical: {exact}")
    print(
        f"time: lmforge {our_s:.2f}s, lm-eval {their_s:.2f}s (lm-eval / lmforge = {their_s / our_s:.2f}x)"
    )
    print(
        json.dumps(
            {"lmforge": ours, "lm_eval": theirs, "seconds": {"lmforge": our_s, "lm_eval": their_s}}
        )
    )


if __name__ == "__main__":
    main()
