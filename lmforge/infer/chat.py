"""Chat with a model: a conversation rendered by the model's own chat template, streamed replies,
and the REPL behind `lmforge chat` (/reset, /system, /save, /help)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.prompting import (
    ZERO_SHOT_COT_TRIGGER,
    arithmetic_cot_demos,
    select_demos,
    vote,
)
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.tools import (
    CALCULATOR,
    Tool,
    generate_many_with_tools,
    make_tools,
    tool_instructions,
)
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

# Tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Gemma, Phi-3);
# a model stops at whichever of them its vocabulary has, besides EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /save PATH      write the conversation as JSON
  /cot MODE       chain-of-thought: none, zeroshot ("Let's think step by step") or fewshot
  /sc N           self-consistency: vote over N sampled answers (1: off)
  /tools NAMES    calculator and/or retrieval (comma-separated; "off" for none)
  /help           this list
  /quit or Ctrl-D leave"""


def end_of_turn_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    ids = {tokenizer.token_to_id(t) for t in END_OF_TURN}
    ids.add(tokenizer.eos_id)
    return tuple(sorted(i for i in ids if i is not None))


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, str]], continuation: str = ""
) -> list[int]:
    """Token ids of a conversation rendered for the assistant's next turn, plus `continuation`:
    text the assistant turn already begins with (a CoT trigger, earlier tool calls and results)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True) + continuation
    bos = tokenizer.bos_token
    # Templates such as Llama's write the BOS token themselves; add it only when they don't.
    return tokenizer.encode(text, add_bos=tokenizer.adds_bos and not (bos and text.startswith(bos)))


def with_methods(
    messages: list[dict[str, str]],
    *,
    demos: Sequence[tuple[str, str]] = (),
    tools: Sequence[Tool] = (),
    zero_shot_cot: bool = False,
    continuation: str = "",
) -> tuple[list[dict[str, str]], str]:
    """A conversation with prompting methods applied, and the text the assistant's turn starts
    with: demonstrations as earlier exchanges before the last user message (lm-eval's
    fewshot_as_multiturn), tool instructions in the system turn, and the answer opened by the
    zero-shot CoT trigger (Kojima et al. 2022)."""
    messages = list(messages)
    if demos:
        last_user = [i for i, m in enumerate(messages) if m["role"] == "user"]
        at = last_user[-1] if last_user else len(messages)
        shots = []
        for text, target in demos:
            shots += [{"role": "user", "content": text}, {"role": "assistant", "content": target}]
        messages = messages[:at] + shots + messages[at:]
    if tools:
        note = tool_instructions(tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
        else:
            messages.insert(0, {"role": "system", "content": note})
    if zero_shot_cot:
        continuation = " ".join(filter(None, [ZERO_SHOT_COT_TRIGGER, continuation]))
    return messages, continuation


class ChatSession:
    """A conversation with one model: history, system prompt, streamed replies.

    Replies come from one Engine kept for the session whose prefix cache holds the rendered
    conversation, so each turn computes only the tokens added since the last one. Prompting
    methods can be switched on: cot ("zeroshot"/"fewshot"), self_consistency (n sampled answers,
    majority vote) and tools (lmforge.infer.tools); `last_info` then holds the tool calls and
    the vote of the last reply.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        params: SamplingParams,
        *,
        system: str = "",
        max_context: int = 4096,
        cot: str = "none",
        self_consistency: int = 1,
        tools: Sequence[Tool] = (),
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        context = min(max_context, model.config.max_seq_len)
        # Self-consistency samples decode as one batch, so the engine gets a slot per sample.
        self.engine = Engine(
            model,
            tokenizer,
            max_batch=max(1, self_consistency),
            max_context=context,
            prefix_cache_tokens=context,
        )
        self.cot, self.self_consistency, self.tools = cot, self_consistency, list(tools)
        self.last_info: dict = {}
        self.docs: str | None = None  # the folder /tools retrieval searches
        # texts -> unit vectors ranking those passages and similar demonstrations (None: BM25)
        self.embed = None
        stops = (*params.stop_token_ids, *end_of_turn_ids(tokenizer))
        self.params = replace(params, stop_token_ids=tuple(dict.fromkeys(stops)))
        self.system = system
        self.turns: list[dict[str, str]] = []
        self.dropped_turns = 0  # user/assistant pairs forgotten to fit the context window

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns, self.dropped_turns = [], 0

    def set_system(self, text: str) -> None:
        self.system = text
        self.reset()

    def prompt_ids(self) -> list[int]:
        """The conversation rendered for the assistant's next turn, oldest exchanges dropped
        while it would leave no room for max_new_tokens in the context window."""
        limit = self.engine.max_context
        budget = limit - self.params.max_new_tokens
        while True:
            ids = self._render()
            if len(ids) <= budget or len(self.turns) <= 1:
                break
            self.turns = self.turns[2:]
            self.dropped_turns += 1
        if len(ids) > limit:
            raise LmforgeError(
                f"the message needs {len(ids)} tokens, more than the chat's context of {limit}"
            )
        return ids

    def _render(self) -> list[int]:
        demos = []
        if self.cot == "fewshot":  # the exemplars nearest to the question (Liu et al. 2022)
            pool = arithmetic_cot_demos(calculator=CALCULATOR in self.tools)
            question = self.turns[-1]["content"] if self.turns else ""
            demos = select_demos(
                question, pool, 4, method="similar", order="similar_last", embed=self.embed
            )
        messages, continuation = with_methods(
            self.messages, demos=demos, tools=self.tools, zero_shot_cot=self.cot == "zeroshot"
        )
        return encode_chat(self.tokenizer, messages, continuation)

    def _reply_with_tools_or_votes(self, ids: list[int]) -> str:
        """Tool calls run and resume generation; with self-consistency n answers are sampled in
        one batch and the first one giving the majority answer is kept (Wang et al. 2023)."""
        n = self.self_consistency
        params = self.params
        if n > 1 and params.temperature == 0:
            params = replace(params, temperature=0.7)  # greedy samples would all be the same
        seeded = [
            replace(params, seed=params.seed + i) if params.seed is not None else params
            for i in range(n)
        ]
        outs = generate_many_with_tools(self.engine, self.tokenizer, [ids] * n, seeded, self.tools)
        best, self.last_info = outs[0], {}
        if n > 1:
            v = vote([o.text for o in outs])
            best = next(o for o, a in zip(outs, v.answers) if a == v.answer)
            self.last_info["self_consistency"] = {
                "answer": v.answer,
                "vote_share": v.share,
                "answers": v.answers,
            }
        if best.calls:
            self.last_info["tool_calls"] = [c.to_dict() for c in best.calls]
        return best.text

    def stream_reply(self, user_text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply, which joins the history."""
        self.turns.append({"role": "user", "content": user_text})
        try:
            ids = self.prompt_ids()
        except LmforgeError:
            self.turns.pop()
            raise
        pieces = []
        if self.tools or self.self_consistency > 1:
            pieces.append(self._reply_with_tools_or_votes(ids))
            yield pieces[0]
        else:
            self.last_info = {}
            for piece in self.engine.stream(ids, self.params):
                pieces.append(piece)
                yield piece
        self.turns.append({"role": "assistant", "content": "".join(pieces).strip()})

    def ask(self, user_text: str) -> str:
        return "".join(self.stream_reply(user_text)).strip()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n"
        )
        return path


def set_method(session: ChatSession, command: str, arg: str) -> str:
    """Apply a /cot, /sc or /tools command to the session; return what is now on."""
    if command == "/cot":
        if arg not in ("none", "zeroshot", "fewshot"):
            raise LmforgeError("usage: /cot none|zeroshot|fewshot")
        session.cot = arg
        return f"(chain-of-thought: {arg})"
    if command == "/sc":
        n = int(arg)
        if not 1 <= n <= 32:
            raise LmforgeError("usage: /sc N with 1 <= N <= 32")
        if n > session.engine.max_batch:  # a slot per sample, so they decode as one batch
            session.engine = Engine(
                session.model,
                session.tokenizer,
                max_batch=n,
                max_context=session.engine.max_context,
                prefix_cache_tokens=session.engine.max_context,
            )
        session.self_consistency = n
        return f"(self-consistency: {n} samples)" if n > 1 else "(self-consistency off)"
    names = [] if arg in ("", "off", "none") else [a.strip() for a in arg.split(",")]
    session.tools = make_tools(names, session.docs, embed=session.embed)
    return f"(tools: {', '.join(names) or 'off'})"


def repl(
    session: ChatSession,
    read: Callable[[str], str] | None = None,
    write: Callable[[str], None] | None = None,
) -> None:
    """Read lines (default: input()), run commands, stream replies (default: to stdout), until
    /quit or end of input."""
    read = read or input  # looked up at call time, so a patched builtins.input is honoured
    write = write or (lambda s: print(s, end="", flush=True))
    write("chat: /help lists the commands; /quit or Ctrl-D leaves\n")
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            write(HELP + "\n")
        elif command == "/reset":
            session.reset()
            write("(conversation cleared)\n")
        elif command == "/system":
            session.set_system(arg.strip())
            write("(system prompt set; conversation cleared)\n")
        elif command == "/save":
            if not arg.strip():
                write("usage: /save PATH\n")
                continue
            write(f"(saved to {session.save(arg.strip())})\n")
        elif command in ("/cot", "/sc", "/tools"):
            try:
                write(set_method(session, command, arg.strip()) + "\n")
            except (LmforgeError, ValueError) as e:
                write(f"error: {e}\n")
        elif command.startswith("/"):
            write(f"unknown command {command}; /help lists the commands\n")
        else:
            try:
                before = session.dropped_turns
                for piece in session.stream_reply(line):
                    write(piece)
                write("\n")
                for call in session.last_info.get("tool_calls", []):
                    write(f"(tool {call['name']}: {call['argument']} -> {call['result']})\n")
                if vote_info := session.last_info.get("self_consistency"):
                    share = round(vote_info["vote_share"] * len(vote_info["answers"]))
                    write(
                        f"(self-consistency: answer {vote_info['answer']}, {share} of "
                        f"{len(vote_info['answers'])} votes: {', '.join(vote_info['answers'])})\n"
                    )
                if session.dropped_turns > before:
                    write("(oldest exchanges dropped to fit the context window)\n")
            except LmforgeError as e:
                write(f"error: {e}\n")
