"""Tools: the calculator (exact values, precedence, errors, no eval), BM25 against a score worked
out by hand, the retrieval folder, and the generate-call-resume loop on a scripted engine."""

from __future__ import annotations

import math

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer import tools
from lmforge.infer.retrieval import BM25, PassageIndex, terms
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sequence import Generation
from lmforge.infer.tools import calculate, evaluate_arithmetic, generate_with_tools


@pytest.mark.parametrize(
    "expression,value",
    [
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        ("2**3**2", "512"),  # right-associative
        ("-2**2", "-4"),  # unary minus binds looser than **
        ("7/2", "3.5"),
        ("8/2", "4"),
        ("7//2", "3"),
        ("-7//2", "-4"),
        ("7%3", "1"),
        ("0.1+0.2", "0.3"),
        ("2^10", "1024"),
        ("3 × 4 ÷ 6", "2"),
        ("12*7 =", "84"),
        ("4 * 3 = 12", "12"),  # a whole step: what precedes "=" is computed
        ("1/3", "0.3333333333"),
    ],
)
def test_calculator_values(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression,error",
    [
        ("2+", "malformed"),
        ("", "empty"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("10**400", "too large"),
        ("9**9**9", "too large"),
        ("2**-5000", "too large"),
        ("1e308*10", "too large"),
        ("(-8)**0.5", "not a real number"),
        ("__import__('os').system('true')", "unsupported"),
        ("open('/etc/passwd')", "unsupported"),
        ("x + 1", "unsupported"),
        ("[1, 2]", "unsupported"),
        ("1 if 1 else 2", "unsupported"),
        ("'a' * 3", "unsupported"),
        ("True + 1", "unsupported"),
        ("1" * 300, "longer than"),
    ],
)
def test_calculator_errors_are_results_the_model_reads(expression, error):
    result = calculate(expression)
    assert result.startswith("error:") and error in result


def test_calculator_never_calls_eval(monkeypatch):
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("eval/exec must not be used")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert evaluate_arithmetic("(1+2)*3") == 9


def test_bm25_matches_a_hand_computed_score():
    docs = ["the cat sat", "the dog sat down", "a bird"]
    index = BM25(docs, k1=1.5, b=0.75)
    # Query "cat sat" against document 0: N = 3, avgdl = (3 + 4 + 2) / 3 = 3, |d| = 3.
    # idf(cat) = ln(1 + (3 - 1 + .5) / (1 + .5)), idf(sat) = ln(1 + (3 - 2 + .5) / (2 + .5)).
    # Each term occurs once: tf part = 1 * 2.5 / (1 + 1.5 * (1 - .75 + .75 * 3 / 3)) = 1.
    expected = math.log(1 + 2.5 / 1.5) + math.log(1 + 1.5 / 2.5)
    scores = index.scores("cat sat")
    assert scores[0] == pytest.approx(expected, rel=1e-12)
    # Document 1 only has "sat" and is longer: tf part = 2.5 / (1 + 1.5 * (.25 + .75 * 4 / 3)).
    assert scores[1] == pytest.approx(math.log(1 + 1.5 / 2.5) * 2.5 / (1 + 1.5 * 1.25))
    assert scores[2] == 0.0
    assert index.top("cat sat", 2)[0][0] == 0


def test_terms_split_chinese_into_characters():
    assert terms("我去了咖啡店 Coffee-shop") == [
        "我",
        "去",
        "了",
        "咖",
        "啡",
        "店",
        "coffee",
        "shop",
    ]


def test_retrieval_tool_finds_the_right_paragraph(tmp_path):
    (tmp_path / "shop.md").write_text(
        "The coffee shop opens at 7 am.\n\nIt closes at 6 pm on weekdays.\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "trains.txt").write_text("The train leaves at noon.")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    index = PassageIndex(tmp_path)
    assert len(index.passages) == 3
    assert index.search("when does the train leave")[0].source == "sub/trains.txt"
    tool = tools.retrieval_tool(tmp_path)
    assert tool.run("coffee shop opens") == "The coffee shop opens at 7 am."
    assert tool.run("zebra") == "no matching passage"


def test_retrieval_folder_errors(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        tools.retrieval_tool(tmp_path / "missing")
    with pytest.raises(LmforgeError, match="no .txt or .md"):
        tools.retrieval_tool(tmp_path)
    with pytest.raises(LmforgeError, match="needs a folder"):
        tools.make_tools(["retrieval"])
    with pytest.raises(LmforgeError, match="unknown tool"):
        tools.make_tools(["shell"])


def test_pending_call_finds_an_unclosed_call():
    calc = tools.CALCULATOR
    assert tools.pending_call("so <calc>3*4", [calc]) == (calc, "3*4")
    assert tools.pending_call("<calc>1</calc><result>1</result> done", [calc]) is None
    assert tools.pending_call("no call", [calc]) is None


class ScriptedEngine:
    """Answers each generate() with the next scripted texts, recording prompts and params."""

    max_context = 1000

    def __init__(self, script):
        self.script, self.prompts, self.params = list(script), [], []

    def generate(self, prompts, params):
        self.prompts += prompts
        self.params += params
        return [Generation([0] * len(t), t, "stop") for t in self.script.pop(0)]


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]


def test_tool_loop_inserts_results_and_resumes():
    # The second round writes a malformed call: its error goes back to the model, which answers.
    engine = ScriptedEngine([["3 boxes of 4 is <calc>3*4"], [" then <calc>12+("], [" so 12."]])
    out = generate_with_tools(
        engine, CharTokenizer(), [1, 2], SamplingParams(max_new_tokens=100), [tools.CALCULATOR]
    )
    assert out.text == (
        "3 boxes of 4 is <calc>3*4</calc><result>12</result> then "
        "<calc>12+(</calc><result>error: malformed expression '12+('</result> so 12."
    )
    assert [c.result for c in out.calls] == ["12", "error: malformed expression '12+('"]
    resumed = "".join(chr(i) for i in engine.prompts[1][2:])
    assert resumed == "3 boxes of 4 is <calc>3*4</calc><result>12</result>"
    assert "</calc>" in engine.params[0].stop_strings
    # Each round may only use what the earlier rounds left of max_new_tokens.
    assert engine.params[1].max_new_tokens == 100 - len("3 boxes of 4 is <calc>3*4")


def test_tool_loop_stops_after_max_calls():
    engine = ScriptedEngine([["<calc>1+1"]] * 3)
    out = generate_with_tools(
        engine,
        CharTokenizer(),
        [1],
        SamplingParams(max_new_tokens=100),
        [tools.CALCULATOR],
        max_calls=2,
    )
    assert len(out.calls) == 2 and len(engine.prompts) == 3
