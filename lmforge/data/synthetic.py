"""Rule-generated tasks with worked rationales: arithmetic word problems (three difficulty levels),
sorting, reversing, counting, unit conversion and comparisons, in English and Chinese phrasings. Used for evaluation, instruction tuning and preference pairs.

Splits are decided by hashing each item's question, not by its position in a stream, so a
question lands in the same split whatever the seed or count asked for, and nothing in "train" is
ever scored in "test" (seed 004: instruction data "任务描述+任务例子" must stay apart from the
benchmark). Add a task by writing a `make(rng, level) -> Item` function and registering it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

from lmforge.errors import LmforgeError

SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}

NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]


@dataclass(frozen=True)
class Item:
    """One rule-generated example; `answer` is the short gold answer, `rationale` the worked steps."""

    task: str
    level: int
    question: str
    rationale: str
    answer: str

    @property
    def id(self) -> str:
        return hashlib.sha256(f"{self.task}|{self.question}".encode()).hexdigest()[:16]

    @property
    def solution(self) -> str:
        """Rationale then the answer line GSM8K uses, so strict "#### N" extraction works."""
        return f"{self.rationale}\n#### {self.answer}"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "id": self.id,
            "solution": self.solution,
            "meta": {"synthetic": True, "generator": "lmforge.data.synthetic"},
        }


def split_of(item: Item) -> str:
    """The split an item belongs to, fixed by a hash of its task and question."""
    u = int(hashlib.sha256(f"{item.task}|{item.question}".encode()).hexdigest()[:12], 16) / 16**12
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= u < hi)


def _arithmetic(rng: random.Random, level: int) -> Item:
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if level == 1:
        if rng.random() < 0.5:
            q = f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?"
            return Item(
                "arithmetic",
                1,
                q,
                f"{name} starts with {a} {thing} and gets {b} more, so {a} + {b} = {a + b}.",
                str(a + b),
            )
        a, b = max(a, b) + 1, min(a, b)
        q = f"{name} has {a} {thing} and gives {b} of them to {other}. How many {thing} does {name} have left?"
        return Item(
            "arithmetic",
            1,
            q,
            f"{name} starts with {a} {thing} and gives away {b}, so {a} - {b} = {a - b}.",
            str(a - b),
        )
    c = rng.randint(2, 9)
    if level == 2:
        q = (
            f"{name} buys {c} bags with {a} {thing} in each bag, then finds {b} more. "
            f"How many {thing} does {name} have?"
        )
        r = f"{c} bags of {a} is {c} * {a} = {c * a}. Adding {b} gives {c * a} + {b} = {c * a + b}."
        return Item("arithmetic", 2, q, r, str(c * a + b))
    d = rng.randint(2, 6)
    total = c * a * d  # divisible by d by construction
    give = rng.randint(1, total // d - 1)
    q = (
        f"{name} has {c} boxes of {a * d} {thing}. {name} shares them equally among {d} friends, "
        f"and each friend then gives {give} {thing} to {other}. How many {thing} does each friend keep?"
    )
    r = (
        f"{c} boxes of {a * d} is {c} * {a * d} = {total}. Shared among {d} friends, each gets "
        f"{total} / {d} = {total // d}. After giving away {give}, each keeps {total // d} - {give} = {total // d - give}."
    )
    return Item("arithmetic", 3, q, r, str(total // d - give))


def _sorting(rng: random.Random, level: int) -> Item:
    values = rng.sample(range(1, 10 ** (level + 1)), 2 + 2 * level)
    ordered = sorted(values)
    q = f"Sort these numbers from smallest to largest: {', '.join(map(str, values))}."
    steps = " ".join(f"The smallest remaining is {v}." for v in ordered)
    return Item("sorting", level, q, steps, ", ".join(map(str, ordered)))


def _counting(rng: random.Random, level: int) -> Item:
    target = rng.choice(THINGS[:4])
    words = [rng.choice(THINGS[:4]) for _ in range(3 + 3 * level)]
    n = words.count(target)
    q = f"How many times does the word '{target}' appear in this list: {' '.join(words)}?"
    hits = [str(i + 1) for i, w in enumerate(words) if w == target]
    r = (
        f"It appears at positions {', '.join(hits)}, so {n} times."
        if hits
        else "It never appears, so 0 times."
    )
    return Item("counting", level, q, r, str(n))


def _comparison(rng: random.Random, level: int) -> Item:
    a, b = rng.sample(range(1, 10 ** (level + 1)), 2)
    q = f"Which number is larger, {a} or {b}?"
    big = max(a, b)
    return Item(
        "comparison",
        level,
        q,
        f"{a} {'>' if a > b else '<'} {b}, so the larger is {big}.",
        str(big),
    )


def _reversing(rng: random.Random, level: int) -> Item:
    letters = "abcdefghijklmnopqrstuvwxyz"
    word = "".join(rng.choice(letters) for _ in range(2 + 2 * level))
    q = f"Reverse the letters of '{word}'."
    steps = " ".join(f"Take '{c}'." for c in reversed(word))
    return Item("reversing", level, q, steps, word[::-1])


# (unit, smaller unit, factor): multiply by the factor to convert to the smaller unit.
UNITS = [("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilometers", "meters", 1000), ("liters", "milliliters", 1000)]  # fmt: skip
UNITS_ZH = {"meters": "米", "centimeters": "厘米", "kilograms": "千克", "grams": "克", "hours": "小时",
            "minutes": "分钟", "seconds": "秒", "kilometers": "千米", "liters": "升",
            "milliliters": "毫升"}  # fmt: skip


def _unit_conversion(rng: random.Random, level: int) -> Item:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 10 ** (level + 1))
    if level == 3:  # the other direction: divide
        q = f"How many {big} are {n * factor} {small}?"
        r = f"1 {big[:-1]} is {factor} {small}, so {n * factor} / {factor} = {n}."
        return Item("unit_conversion", level, q, r, str(n))
    q = f"How many {small} are {n} {big}?"
    r = f"1 {big[:-1]} is {factor} {small}, so {n} * {factor} = {n * factor}."
    return Item("unit_conversion", level, q, r, str(n * factor))


# Chinese phrasings of the same rules (seed 003 §3.4.1: instruction data in both languages). The
# task name carries the language so the hash splits of the two phrasings are separate.
NAMES_ZH = ["小明", "小红", "小刚", "小丽", "阿华", "小芳", "老王", "小李"]
THINGS_ZH = ["苹果", "弹珠", "贴纸", "书", "铅笔", "饼干", "邮票", "贝壳"]


def _arithmetic_zh(rng: random.Random, level: int) -> Item:
    name, other = rng.sample(NAMES_ZH, 2)
    thing = rng.choice(THINGS_ZH)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if level == 1:
        q = f"{name}有{a}个{thing}，{other}又给了{name}{b}个。{name}现在有多少个{thing}？"
        r = f"{name}原来有{a}个，又得到{b}个，所以{a} + {b} = {a + b}。"
        return Item("arithmetic_zh", 1, q, r, str(a + b))
    c = rng.randint(2, 9)
    if level == 2:
        q = f"{name}买了{c}袋{thing}，每袋{a}个，后来又找到{b}个。{name}一共有多少个{thing}？"
        r = f"{c}袋每袋{a}个是{c} * {a} = {c * a}。再加{b}个：{c * a} + {b} = {c * a + b}。"
        return Item("arithmetic_zh", 2, q, r, str(c * a + b))
    d = rng.randint(2, 6)
    total = c * a * d
    q = f"{name}有{c}盒{thing}，每盒{a * d}个，平均分给{d}个朋友。每个朋友分到多少个？"
    r = f"一共{c} * {a * d} = {total}个，平均分给{d}人：{total} / {d} = {total // d}。"
    return Item("arithmetic_zh", 3, q, r, str(total // d))


def _sorting_zh(rng: random.Random, level: int) -> Item:
    values = rng.sample(range(1, 10 ** (level + 1)), 2 + 2 * level)
    ordered = sorted(values)
    q = f"把这些数从小到大排列：{'，'.join(map(str, values))}。"
    steps = "".join(f"剩下最小的是{v}。" for v in ordered)
    return Item("sorting_zh", level, q, steps, ", ".join(map(str, ordered)))


def _reversing_zh(rng: random.Random, level: int) -> Item:
    letters = "abcdefghijklmnopqrstuvwxyz"
    word = "".join(rng.choice(letters) for _ in range(2 + 2 * level))
    q = f"把“{word}”的字母倒过来写。"
    steps = "".join(f"取“{c}”。" for c in reversed(word))
    return Item("reversing_zh", level, q, steps, word[::-1])


def _counting_zh(rng: random.Random, level: int) -> Item:
    target = rng.choice(THINGS_ZH[:4])
    words = [rng.choice(THINGS_ZH[:4]) for _ in range(3 + 3 * level)]
    n = words.count(target)
    q = f"“{target}”在这个列表里出现了几次：{'、'.join(words)}？"
    hits = [str(i + 1) for i, w in enumerate(words) if w == target]
    r = f"它出现在第{'、'.join(hits)}个位置，共{n}次。" if hits else "它没有出现，0次。"
    return Item("counting_zh", level, q, r, str(n))


def _unit_conversion_zh(rng: random.Random, level: int) -> Item:
    big, small, factor = rng.choice(UNITS)
    zb, zs = UNITS_ZH[big], UNITS_ZH[small]
    n = rng.randint(2, 10 ** (level + 1))
    q = f"{n}{zb}等于多少{zs}？"
    r = f"1{zb}是{factor}{zs}，所以{n} * {factor} = {n * factor}。"
    return Item("unit_conversion_zh", level, q, r, str(n * factor))


def _comparison_zh(rng: random.Random, level: int) -> Item:
    a, b = rng.sample(range(1, 10 ** (level + 1)), 2)
    big = max(a, b)
    r = f"{a} {'>' if a > b else '<'} {b}，所以较大的是{big}。"
    return Item("comparison_zh", level, f"{a}和{b}哪个数更大？", r, str(big))


GENERATORS: dict[str, Callable[[random.Random, int], Item]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "counting": _counting,
    "comparison": _comparison,
    "reversing": _reversing,
    "unit_conversion": _unit_conversion,
    "arithmetic_zh": _arithmetic_zh,
    "sorting_zh": _sorting_zh,
    "reversing_zh": _reversing_zh,
    "counting_zh": _counting_zh,
    "unit_conversion_zh": _unit_conversion_zh,
    "comparison_zh": _comparison_zh,
}
# The rule-generated instruction set of seed 003 §3.4.1, by language.
INSTRUCTION_TASKS = {
    "en": ("arithmetic", "sorting", "reversing", "counting", "unit_conversion", "comparison"),
    "zh": ("arithmetic_zh", "sorting_zh", "reversing_zh", "counting_zh", "unit_conversion_zh",
           "comparison_zh"),
}  # fmt: skip
LEVELS = (1, 2, 3)


def generate(
    task: str, n: int, *, split: str = "test", levels: tuple[int, ...] = LEVELS, seed: int = 0
) -> list[Item]:
    """`n` distinct items of `task` from `split`, cycling through `levels`; deterministic."""
    if task not in GENERATORS:
        raise LmforgeError(f"unknown synthetic task {task!r}; known: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise LmforgeError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if bad := [lv for lv in levels if lv not in LEVELS]:
        raise LmforgeError(f"synthetic task {task}: levels must be in {LEVELS}, got {bad}")
    rng = random.Random(f"{task}:{seed}")
    items: list[Item] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        item = GENERATORS[task](rng, levels[len(items) % len(levels)])
        if item.question not in seen and split_of(item) == split:
            seen.add(item.question)
            items.append(item)
            if len(items) == n:
                return items
    raise LmforgeError(f"synthetic task {task}: could only make {len(items)} of {n} {split} items")


def instruction_example(item: Item, *, with_rationale: bool = True) -> dict:
    """An instruction-tuning instance (instruction, input, output) for the item."""
    output = item.solution if with_rationale else item.answer
    return {
        "instruction": item.question,
        "input": "",
        "output": output,
        "meta": item.to_dict()["meta"],
    }


def preference_pair(item: Item, seed: int = 0) -> dict:
    """A preference pair: the correct solution is chosen, one with a wrong final answer rejected."""
    rng = random.Random(f"{item.id}:{seed}")
    try:
        wrong = str(int(item.answer) + rng.choice([-2, -1, 1, 2]))
    except ValueError:
        wrong = item.answer[::-1] if item.answer[::-1] != item.answer else item.answer + "0"
    return {
        "prompt": item.question,
        "chosen": item.solution,
        "rejected": f"{item.rationale}\n#### {wrong}",
        "meta": item.to_dict()["meta"],
    }


def instruction_set(
    n_per_task: int,
    *,
    split: str = "train",
    tasks: tuple[str, ...] | None = None,
    languages: tuple[str, ...] = ("en", "zh"),
    levels: tuple[int, ...] = LEVELS,
    with_rationale: bool = True,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """The rule-generated instruction set: `n_per_task` instances of each task (default: every
    task in `languages`), grouped by task for mixing; deterministic and split-disjoint."""
    if bad := [lang for lang in languages if lang not in INSTRUCTION_TASKS]:
        raise LmforgeError(f"unknown languages {bad}; known: {', '.join(INSTRUCTION_TASKS)}")
    names = tasks or tuple(t for lang in languages for t in INSTRUCTION_TASKS[lang])
    return {
        t: [
            instruction_example(it, with_rationale=with_rationale)
            for it in generate(t, n_per_task, split=split, levels=levels, seed=seed)
        ]
        for t in names
    }
