"""Task formats and prompting: the BIG-bench loader on a task.json written here, JSONL answers in
every spelling, few-shot determinism, CoT and chat prompts, synthetic splits, bad-input errors."""

import json

import pytest

from lmforge.data import synthetic
from lmforge.errors import LmforgeError
from lmforge.evaluation.harness import EvalConfig, _build
from lmforge.evaluation.tasks import TaskConfig, TaskError, load_task, load_task_file, resolve_task
from lmforge.infer import prompting
from lmforge.tokenizer import train_bpe


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BIGBENCH = {
    "name": "tiny_bb",
    "task_prefix": "Answer the riddles.\n",
    "example_input_prefix": "\nRiddle: ",
    "example_output_prefix": "\nSolution: ",
    "choice_prefix": "\n  option: ",
    "append_choices_to_input": True,
    "examples": [
        {
            "input": "What has keys but no locks?",
            "target_scores": {"a piano": 1, "a door": 0, "a map": 0},
        },
        {"input": "What gets wetter as it dries?", "target_scores": {"a towel": 1, "rain": 0}},
        {"input": "What has hands but cannot clap?", "target_scores": {"a clock": 1, "a tree": 0}},
    ],
}


def test_bigbench_multiple_choice_honours_its_prefixes(tmp_path):
    (tmp_path / "task.json").write_text(json.dumps(BIGBENCH))
    task = load_task(resolve_task(str(tmp_path)))
    assert (
        task.output_type == "multiple_choice" and task.config.metadata["bigbench_name"] == "tiny_bb"
    )
    doc = task.docs[0]
    assert doc["choices"] == ["a piano", "a door", "a map"] and doc["gold"] == [0]
    assert doc["input"].startswith("\nRiddle: What has keys but no locks?\n  option: ")
    assert doc["input"].endswith("\nSolution: ")
    shown = doc["input"].split("\n  option: ")[1:]
    shown[-1] = shown[-1].removesuffix("\nSolution: ")
    assert sorted(shown) == sorted(doc["choices"])
    item = _build(task, 0, doc, EvalConfig(shots=1), None)
    assert item.prompt.startswith("Answer the riddles.\n\nRiddle: ")
    # one demonstration: its input, its best choice, BIG-bench's "\n" separator, then the query
    assert item.prompt.count("\nSolution: ") == 2 and item.prompt.endswith(doc["input"])
    no_choices = {**BIGBENCH, "append_choices_to_input": False}
    (tmp_path / "task.json").write_text(json.dumps(no_choices))
    assert "option" not in load_task(resolve_task(str(tmp_path))).docs[0]["input"]


def test_bigbench_generative_targets(tmp_path):
    spec = {
        "examples": [{"input": "2+2", "target": ["4", "four"]}, {"input": "3+3", "target": "6"}]
    }
    (tmp_path / "task.json").write_text(json.dumps(spec))
    task = load_task(resolve_task(str(tmp_path / "task.json")))
    assert task.output_type == "generate_until" and task.docs[0]["targets"] == ["4", "four"]
    assert task.docs[1]["input"] == "\nQ: 3+3\nA: " and task.config.until == ["\n"]


def test_jsonl_answers_and_gsm8k_split(tmp_path):
    rows = [
        {"question": "q1", "choices": ["x", "y", "z"], "answer": 2},
        {"question": "q2", "choices": ["x", "y", "z"], "answer": "B"},
        {"question": "q3", "choices": ["x", "y", "z"], "answer": "x"},
    ]
    task = load_task(TaskConfig(name="mc", data=str(write_jsonl(tmp_path / "mc.jsonl", rows))))
    assert [d["gold"] for d in task.docs] == [[2], [1], [0]]
    gsm = [{"question": "How many?", "answer": "3 + 4 = 7\n#### 1,007"}]
    task = load_task(TaskConfig(name="gsm", data=str(write_jsonl(tmp_path / "g.jsonl", gsm))))
    assert task.docs[0]["answer"] == "1007" and task.docs[0]["rationale"] == "3 + 4 = 7"


def test_fewshot_is_deterministic_and_never_the_item_itself(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(12)]
    config = TaskConfig(name="g", data=str(write_jsonl(tmp_path / "g.jsonl", rows)))
    task = load_task(config)

    def prompts(seed, shots=3):
        return [
            _build(task, i, d, EvalConfig(shots=shots, seed=seed), None).prompt
            for i, d in enumerate(task.docs)
        ]

    assert prompts(1) == prompts(1) and prompts(1) != prompts(2)
    for i, p in enumerate(prompts(1)):
        assert p.count("Question:") == 4 and p.count(f"Question: q{i}\n") == 1
    with pytest.raises(
        LmforgeError, match="task g: asked for 12 demonstrations but the few-shot split has only 11"
    ):
        prompts(1, shots=12)


def test_cot_and_chat_prompts():
    config = resolve_task("arithmetic")
    config.limit = 2
    task = load_task(config)
    doc = task.docs[0]
    direct = _build(task, 0, doc, EvalConfig(shots=2), None).prompt
    cot = _build(task, 0, doc, EvalConfig(shots=2, cot="fewshot"), None).prompt
    zero = _build(task, 0, doc, EvalConfig(cot="zeroshot"), None).prompt
    assert "####" not in direct and cot.count("####") == 2
    assert zero.endswith("Answer: Let's think step by step.")
    tok = train_bpe(["hello world"] * 5, 300)
    chat = _build(task, 0, doc, EvalConfig(shots=1, chat=True), tok).prompt
    assert chat.count("<|im_start|>user\n") == 2 and chat.endswith("<|im_start|>assistant\n")
    fmt = prompting.PromptFormat(description="Solve.\n\n")
    assert prompting.build_prompt("Q", [("a", "1")], fmt) == "Solve.\n\na 1\n\nQ"


def test_synthetic_splits_are_disjoint_and_deterministic():
    for task in synthetic.GENERATORS:
        train = synthetic.generate(task, 40, split="train")
        test = synthetic.generate(task, 20, split="test")
        assert {i.question for i in train}.isdisjoint({i.question for i in test})
        assert all(synthetic.split_of(i) == "test" for i in test)
        assert [i.question for i in test] == [
            i.question for i in synthetic.generate(task, 20, split="test")
        ]
    items = synthetic.generate("arithmetic", 6, levels=(1, 2, 3))
    assert [i.level for i in items] == [1, 2, 3, 1, 2, 3]
    for it in items:  # the rationale's last number is the answer, and it ends in "#### answer"
        assert it.solution.endswith(f"#### {it.answer}") and it.rationale.rstrip(".").endswith(
            it.answer
        )
        assert it.to_dict()["meta"]["synthetic"] is True
    pair = synthetic.preference_pair(items[0])
    assert pair["chosen"] != pair["rejected"] and pair["chosen"] == items[0].solution


def test_bad_input_names_the_task_and_item(tmp_path):
    def fails(config, match):
        with pytest.raises(TaskError, match=match):
            load_task(config)

    missing = write_jsonl(
        tmp_path / "m.jsonl",
        [{"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": "q"}],
    )
    fails(
        TaskConfig(name="t1", data=str(missing), output_type="multiple_choice"),
        r"task t1: m.jsonl line 2: missing field\(s\) choices, answer",
    )
    one = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "choices": ["a"], "answer": 0}])
    fails(
        TaskConfig(name="t2", data=str(one)),
        "task t2: one.jsonl line 1: a multiple-choice item needs at least 2 choices",
    )
    gen = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "1"}])
    fails(
        TaskConfig(name="t3", data=str(gen), extract=["regex:(unclosed"]),
        "task t3: extract regex '\\(unclosed' does not compile",
    )
    fails(TaskConfig(name="t4", data=str(gen), metrics=["bleu"]), "task t4: unknown metric 'bleu'")
    fails(
        TaskConfig(name="t5", data=str(tmp_path / "nope.jsonl")),
        "task t5: data file .* does not exist",
    )
    bad_range = write_jsonl(
        tmp_path / "r.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}]
    )
    fails(
        TaskConfig(name="t6", data=str(bad_range)),
        "task t6: r.jsonl line 1: answer 5 is out of range",
    )
    (tmp_path / "bad.yaml").write_text("name: t7\ndata: x.jsonl\nshots_typo: 3\n")
    with pytest.raises(TaskError, match="task file .*bad.yaml: unknown config key 'shots_typo'"):
        load_task_file(tmp_path / "bad.yaml")
    with pytest.raises(TaskError, match="unknown task 'nonexistent'"):
        resolve_task("nonexistent")
