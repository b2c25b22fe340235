"""Tools a model calls from its own output (seed 000 "工具操作"; Toolformer, Schick et al. 2023):
a calculator and a retrieval tool over a folder of text.

Call syntax: the model writes `<calc>12*(3+4)</calc>` or `<search>coffee shop</search>`.
Generation stops at the closing tag (a stop string), the tool runs, its result is inserted as
`<result>84</result>` and generation resumes from there, so the rest of the answer can use it.
A failing call inserts `<result>error: ...</result>`, which the model sees like any result.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.infer.retrieval import PassageIndex
from lmforge.infer.sampling import SamplingParams

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000  # |b| of a ** b
MAX_RESULT_DIGITS = 300  # integers longer than this (and floats beyond 1e300) are refused


class CalculatorError(ValueError):
    """An expression the calculator does not accept (the message is shown to the model)."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Symbols models write for arithmetic that Python spells differently.
_SPELLINGS = {"×": "*", "÷": "/", "^": "**", "−": "-"}


def _check_size(x: int | float) -> int | float:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x) or abs(x) > 1e300):
        raise CalculatorError("result too large")
    if isinstance(x, int) and x.bit_length() > MAX_RESULT_DIGITS * 3.33:
        raise CalculatorError("result too large")
    return x


def _eval(node: ast.AST) -> int | float:
    # Walk the parse tree, allowing only numbers and arithmetic: no names, calls or attributes,
    # so nothing but arithmetic can run (never `eval`).
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
            if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > MAX_RESULT_DIGITS:
                raise CalculatorError("result too large")
            if left == 0 and right < 0:
                raise CalculatorError("division by zero")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
        if isinstance(result, complex):
            raise CalculatorError("the result is not a real number")
        return _check_size(result)
    raise CalculatorError(f"unsupported syntax: {ast.unparse(node) if node else node!r}")


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % ** (also ^ × ÷),
    parentheses and unary signs; anything from "=" on is ignored. Raises CalculatorError for
    anything else."""
    # Models often write the whole step, "4 * 3 = 12": the expression is what precedes "=".
    text = expression.split("=", 1)[0].strip()
    for symbol, python in _SPELLINGS.items():
        text = text.replace(symbol, python)
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"malformed expression {expression.strip()!r}") from None
    return _eval(tree)


def format_number(x: int | float) -> str:
    """Integers (and integral floats) without a decimal point; others to 10 significant digits."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x) if isinstance(x, int) else format(x, ".10g")


def calculate(expression: str) -> str:
    """The calculator tool: the value as text, or "error: ..." for the model to read."""
    try:
        return format_number(evaluate_arithmetic(expression))
    except CalculatorError as e:
        return f"error: {e}"
    except RecursionError:
        return "error: expression nested too deeply"


@dataclass(frozen=True)
class Tool:
    """A tool called as <tag>argument</tag>; `run` maps the argument to the inserted result."""

    name: str  # the OpenAI function name
    tag: str
    argument: str  # the argument's name in OpenAI tool_calls JSON
    description: str
    run: Callable[[str], str]

    @property
    def open(self) -> str:
        return f"<{self.tag}>"

    @property
    def close(self) -> str:
        return f"</{self.tag}>"


CALCULATOR = Tool(
    "calculator",
    "calc",
    "expression",
    "arithmetic with + - * / // % ** and parentheses, e.g. <calc>12*(3+4)</calc>",
    calculate,
)


def retrieval_tool(folder: str | Path, k: int = 1, max_chars: int = 600, embed=None) -> Tool:
    """A tool that returns the k paragraphs of `folder` (.txt/.md files) that best match the
    query by BM25, or by sentence-embedding similarity with `embed` (texts -> unit vectors); a
    missing folder fails here, when the tool is made."""
    index = PassageIndex(folder, embed)

    def search(query: str) -> str:
        found = index.search(query, k)
        if not found:
            return "no matching passage"
        return " ".join(p.text for p in found)[:max_chars]

    return Tool(
        "retrieval",
        "search",
        "query",
        "finds passages in the documents, e.g. <search>opening hours</search>",
        search,
    )


def make_tools(names: Sequence[str], folder: str | Path | None = None, embed=None) -> list[Tool]:
    """Tools by name: "calculator", "retrieval" (needs `folder`; ranks by `embed` if given)."""
    tools = []
    for name in names:
        if name == "calculator":
            tools.append(CALCULATOR)
        elif name == "retrieval":
            if not folder:
                raise LmforgeError("the retrieval tool needs a folder of .txt/.md documents")
            tools.append(retrieval_tool(folder, embed=embed))
        else:
            raise LmforgeError(f"unknown tool {name!r}; known: calculator, retrieval")
    return tools


def tool_instructions(tools: Sequence[Tool]) -> str:
    """The system-prompt text that tells the model how to call the tools."""
    lines = [f"- {t.name}: {t.description}" for t in tools]
    return (
        "You can use tools by writing a call; its result follows as <result>...</result>.\n"
        + "\n".join(lines)
    )


def stop_strings(tools: Sequence[Tool]) -> tuple[str, ...]:
    return tuple(t.close for t in tools)


@dataclass
class ToolCall:
    name: str
    tag: str
    argument: str
    result: str | None = None  # None until run (or when the client runs it)

    def to_dict(self) -> dict:
        return {"name": self.name, "argument": self.argument, "result": self.result}


def pending_call(text: str, tools: Sequence[Tool]) -> tuple[Tool, str] | None:
    """(tool, argument) when `text` ends inside an opened call: generation stopped at a closing
    tag (cut off by the stop string) or ended mid-call."""
    best = None
    for tool in tools:
        start = text.rfind(tool.open)
        if start >= 0 and tool.close not in text[start:] and (best is None or start > best[1]):
            best = (tool, start)
    if best is None:
        return None
    tool, start = best
    return tool, text[start + len(tool.open) :]


def result_text(tool: Tool, result: str) -> str:
    """What is appended after a call's argument: the closing tag and the result."""
    return f"{tool.close}<result>{result}</result>"


def run_call(tool: Tool, argument: str) -> ToolCall:
    """Run a tool; a tool that raises gives an error result instead of stopping generation."""
    try:
        result = tool.run(argument.strip())
    except Exception as e:  # the model reads the error and may try again
        result = f"error: {e}"
    return ToolCall(tool.name, tool.tag, argument.strip(), result)


@dataclass
class ToolGeneration:
    """A continuation with tool calls inserted: the full text and each call with its result."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0


def generate_with_tools(
    engine,
    tokenizer,
    prompt: list[int],
    params: SamplingParams,
    tools: Sequence[Tool],
    *,
    max_calls: int = 8,
) -> ToolGeneration:
    """Generate, running each tool call the model writes and resuming after its result, until
    the model stops without a call, max_calls calls were made or params.max_new_tokens are used."""
    return generate_many_with_tools(
        engine, tokenizer, [prompt], params, tools, max_calls=max_calls
    )[0]


def generate_many_with_tools(
    engine,
    tokenizer,
    prompts: Sequence[list[int]],
    params: SamplingParams | Sequence[SamplingParams],
    tools: Sequence[Tool],
    *,
    max_calls: int = 8,
) -> list[ToolGeneration]:
    """`generate_with_tools` for several prompts, each round decoded as one engine batch."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    out = [ToolGeneration("") for _ in prompts]
    live = list(range(len(prompts)))
    stops = stop_strings(tools)
    for _ in range(max_calls + 1):
        batch, round_params, fits = [], [], []
        for i in live:
            p = params[i]
            ids = list(prompts[i]) + (tokenizer.encode(out[i].text) if out[i].text else [])
            if len(ids) >= engine.max_context:  # no room left to continue after the result
                out[i].finish_reason = "length"
                continue
            budget = p.max_new_tokens - out[i].completion_tokens
            stop = tuple(dict.fromkeys((*p.stop_strings, *stops)))
            batch.append(ids)
            round_params.append(replace(p, max_new_tokens=budget, stop_strings=stop))
            fits.append(i)
        live = fits
        gens = engine.generate(batch, round_params) if batch else []
        still = []
        for i, gen in zip(live, gens):
            result = out[i]
            result.text += gen.text
            result.completion_tokens += len(gen.tokens)
            result.finish_reason = gen.finish_reason
            call = pending_call(result.text, tools)
            used_up = result.completion_tokens >= params[i].max_new_tokens
            if call is None or used_up or len(result.calls) >= max_calls:
                continue
            done = run_call(*call)
            result.calls.append(done)
            result.text += result_text(call[0], done.result)
            still.append(i)
        live = still
        if not live:
            break
    return out
