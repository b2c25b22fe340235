"""Prompting methods compared on rule-generated arithmetic word problems (the test split of
lmforge.data.synthetic, levels 1-3) with SmolLM2-135M-Instruct through its chat template:
zero-shot, few-shot, few-shot CoT, zero-shot CoT, self-consistency (n=5 over few-shot CoT) and
few-shot CoT with calculator calls. Every method's items decode as one continuous batch.

Run: `python benchmarks/prompting.py [--items 40] [--threads 2]`; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from lmforge.data.synthetic import generate as synthetic
from lmforge.infer.chat import encode_chat, end_of_turn_ids, with_methods
from lmforge.infer.engine import Engine
from lmforge.infer.prompting import (
    INVALID,
    arithmetic_cot_demos,
    extract_answer,
    normalize_number,
    vote,
)
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.tools import CALCULATOR, generate_many_with_tools
from lmforge.loading import load, load_tokenizer

SHOTS = 4
DIRECT = "The answer is"


def first_number(text: str) -> str:
    found = re.search(r"-?\d[\d,]*(?:\.\d+)?", text)
    return normalize_number(found.group()) if found else INVALID


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=96, help="new tokens for rationales")
    ap.add_argument("--samples", type=int, default=5, help="self-consistency samples")
    ap.add_argument("--methods", default="zero,few,fewcot,zerocot,sc,calc")
    ap.add_argument("--dump", default="", help="write every output to this JSONL file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load("smollm2"), load_tokenizer("smollm2")
    engine = Engine(model, tokenizer, max_batch=16, max_context=2048, prefix_cache_tokens=8192)
    items = synthetic("arithmetic", args.items, split="test")
    stops = end_of_turn_ids(tokenizer)
    greedy = SamplingParams(max_new_tokens=args.max_new, temperature=0.0, stop_token_ids=stops)
    short = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=stops)
    engine.generate([tokenizer.encode("Hello")], short)  # warm-up: first-call allocations

    # The same SHOTS exemplars for every item (as Wei et al. 2022), so their keys/values are
    # computed once and reused from the prefix cache.
    cot_demos = arithmetic_cot_demos(SHOTS)
    calc_demos = arithmetic_cot_demos(SHOTS, calculator=True)
    answer_demos = [
        (q, target.rsplit("The answer is ", 1)[1].rstrip(".")) for q, target in cot_demos
    ]

    def prompts(demos=(), tools=(), zero_shot_cot=False, start="") -> list[list[int]]:
        out = []
        for it in items:
            messages, cont = with_methods(
                [{"role": "user", "content": f"Q: {it.question}"}],
                demos=demos,
                tools=tools,
                zero_shot_cot=zero_shot_cot,
                continuation=start,
            )
            out.append(encode_chat(tokenizer, messages, cont))
        return out

    def texts(ids, params) -> list[str]:
        return [g.text for g in engine.generate(ids, params)]

    methods = {
        # Direct zero-shot: the answer starts with Kojima et al.'s answer trigger.
        "zero": ('zero-shot ("The answer is")', lambda: texts(prompts(start=DIRECT), short)),
        "few": (f"few-shot ({SHOTS} answers)", lambda: texts(prompts(answer_demos), short)),
        "fewcot": (f"few-shot CoT ({SHOTS} rationales)", lambda: texts(prompts(cot_demos), greedy)),
        "zerocot": (
            'zero-shot CoT ("Let\'s think step by step.")',
            lambda: texts(prompts(zero_shot_cot=True), greedy),
        ),
        "sc": (f"self-consistency (n={args.samples}, T=0.7, few-shot CoT)", None),
        "calc": ("few-shot CoT + calculator tool", None),
    }
    rows = []
    for key in args.methods.split(","):
        name, run = methods[key]
        start = time.perf_counter()
        extra = ""
        outs: list = []
        if key == "sc":
            n = args.samples
            ids = prompts(cot_demos)
            sampled = SamplingParams(
                max_new_tokens=args.max_new, temperature=0.7, stop_token_ids=stops, seed=0
            )
            outs = texts([p for p in ids for _ in range(n)], sampled)
            votes = [vote(outs[i * n : (i + 1) * n]) for i in range(len(items))]
            answers = [v.answer for v in votes]
            share = sum(v.share for v in votes) / len(votes)
            extra = f"mean vote share {share:.2f}"
        elif key == "calc":
            outs = generate_many_with_tools(
                engine, tokenizer, prompts(calc_demos, tools=[CALCULATOR]), greedy, [CALCULATOR]
            )
            answers = [extract_answer(o.text) for o in outs]
            calls = [c for o in outs for c in o.calls]
            errors = sum(c.result.startswith("error") for c in calls)
            extra = f"{len(calls)} calls ({errors} errors)"
        else:
            outs = run()
            # A direct answer is the first number written; a rationale's is extract_answer's.
            direct = key in ("zero", "few")
            answers = [first_number(t) if direct else extract_answer(t) for t in outs]
        seconds = time.perf_counter() - start
        correct = sum(a == it.answer for a, it in zip(answers, items))
        by_level = {
            lv: sum(a == it.answer for a, it in zip(answers, items) if it.level == lv)
            for lv in (1, 2, 3)
        }
        n_level = {lv: sum(it.level == lv for it in items) for lv in (1, 2, 3)}
        levels = " / ".join(f"{by_level[lv]}/{n_level[lv]}" for lv in (1, 2, 3))
        rows.append((name, correct / len(items), levels, seconds, extra))
        if args.dump:
            with open(args.dump, "a") as f:
                for i, (it, a) in enumerate(zip(items, answers)):
                    o = outs[i * args.samples] if key == "sc" else outs[i]
                    text = o.text if hasattr(o, "text") else o
                    f.write(
                        json.dumps({"method": key, "gold": it.answer, "pred": a, "text": text})
                        + "\n"
                    )
        print(f"{name}: {correct}/{len(items)} ({seconds:.0f} s) {extra}", flush=True)

    print(f"\n{len(items)} test items; SmolLM2-135M-Instruct (Q4_1 GGUF, fp32 compute)\n")
    print("| method | accuracy | correct by level 1 / 2 / 3 | time (s) | notes |")
    print("|---|---:|---|---:|---|")
    for name, acc, levels, seconds, extra in rows:
        print(f"| {name} | {acc:.1%} | {levels} | {seconds:.0f} | {extra} |")


if __name__ == "__main__":
    main()
