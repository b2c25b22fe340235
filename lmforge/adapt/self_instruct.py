"""Self-instruct (Wang et al. 2022; seed 002 §5.1.1, seed 003 §3.4.1): a model proposes new
instructions and answers from a few sampled tasks of a pool; a proposal joins the pool only if
its ROUGE-L similarity to every instruction already there is below 0.7 and it passes simple
heuristics (length, no tasks a text model cannot do, a non-empty answer)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

# Wang et al. 2022 §2.3: drop instructions about images, pictures, graphs (a text-only model
# cannot do them) and ones that are too short or too long.
BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
             "maps", "draw", "plot", "go to", "video", "audio", "flowchart", "diagram")  # fmt: skip


def _tokens(text: str) -> list[str]:
    # Words for Latin text and single characters for CJK, so Chinese instructions compare too.
    return re.findall(r"[\u4e00-\u9fff]|[A-Za-z0-9]+", text.lower())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure (Lin 2004): longest common subsequence of the two token sequences."""
    x, y = _tokens(a), _tokens(b)
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for tx in x:
        cur = [0]
        for j, ty in enumerate(y):
            cur.append(prev[j] + 1 if tx == ty else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


def keep(instruction: str, output: str, *, min_words: int = 3, max_words: int = 150) -> str | None:
    """Why a proposal is rejected by the heuristics, or None if it passes."""
    words = len(_tokens(instruction))
    if words < min_words or words > max_words:
        return "length"
    if any(re.search(rf"\b{re.escape(w)}\b", instruction.lower()) for w in BLOCKLIST):
        return "blocklist"
    if not output.strip():
        return "empty output"
    if not instruction[0].isalnum() and not re.match(r"[\u4e00-\u9fff]", instruction):
        return "starts with punctuation"
    return None


def prompt_for(tasks: Sequence[dict]) -> str:
    """The few-shot prompt: numbered tasks with their outputs, then the next number open."""
    parts = [
        f"Task {i + 1}: {t['instruction']}\nOutput: {t['output']}\n" for i, t in enumerate(tasks)
    ]
    return "".join(parts) + f"Task {len(tasks) + 1}:"


def parse(completion: str) -> tuple[str, str] | None:
    """(instruction, output) of a completion "INSTRUCTION\\nOutput: OUTPUT\\nTask ..."."""
    m = re.match(r"\s*(.+?)\s*\nOutput:\s*(.+?)\s*(?:\nTask \d+:|$)", completion, re.S)
    return (m[1].strip(), m[2].strip()) if m else None


def self_instruct(
    seed_tasks: Sequence[dict],
    propose: Callable[[str], str],
    n_new: int,
    *,
    shots: int = 3,
    max_tries: int | None = None,
    threshold: float = 0.7,
    seed: int = 0,
) -> tuple[list[dict], dict[str, int]]:
    """Grow the pool from `seed_tasks` ({instruction, output}) by `n_new` tasks using
    `propose(prompt) -> completion` (e.g. `model_proposer`); returns the new tasks and counts of
    why proposals were rejected."""
    rng = random.Random(seed)
    pool = [dict(t) for t in seed_tasks]
    new: list[dict] = []
    rejected = {"unparsable": 0, "similar": 0, "length": 0, "blocklist": 0, "empty output": 0,
                "starts with punctuation": 0}  # fmt: skip
    for _ in range(max_tries or 20 * n_new):
        if len(new) == n_new:
            break
        parsed = parse(propose(prompt_for(rng.sample(pool, min(shots, len(pool))))))
        if parsed is None:
            rejected["unparsable"] += 1
            continue
        instruction, output = parsed
        if reason := keep(instruction, output):
            rejected[reason] += 1
            continue
        if max(rouge_l(instruction, t["instruction"]) for t in pool) >= threshold:
            rejected["similar"] += 1
            continue
        task = {"instruction": instruction, "input": "", "output": output,
                "meta": {"generator": "self-instruct"}}  # fmt: skip
        pool.append(task)
        new.append(task)
    return new, rejected


def model_proposer(model, tokenizer, *, max_new_tokens: int = 64, temperature: float = 0.7,
                   seed: int = 0) -> Callable[[str], str]:  # fmt: skip
    """A `propose` function that samples a completion from an lmforge model."""
    from lmforge.infer.generate import SamplingParams, generate

    calls = [0]

    def propose(prompt: str) -> str:
        calls[0] += 1
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed + calls[0])  # fmt: skip
        ids = tokenizer.encode(prompt, add_bos=tokenizer.adds_bos)
        return generate(model, [ids], params, tokenizer=tokenizer)[0].text

    return propose
