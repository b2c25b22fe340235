"""Chat with a model: a conversation rendered by the model's own chat template, streamed replies,
and the REPL behind `lmforge chat` (/reset, /system, /save, /help)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

# Tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Gemma, Phi-3);
# a model stops at whichever of them its vocabulary has, besides EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /save PATH      write the conversation as JSON
  /help           this list
  /quit or Ctrl-D leave"""


def end_of_turn_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    ids = {tokenizer.token_to_id(t) for t in END_OF_TURN}
    ids.add(tokenizer.eos_id)
    return tuple(sorted(i for i in ids if i is not None))


class ChatSession:
    """A conversation with one model: history, system prompt, streamed replies.

    Replies come from one Engine kept for the session whose prefix cache holds the rendered
    conversation, so each turn computes only the tokens added since the last one.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        params: SamplingParams,
        *,
        system: str = "",
        max_context: int = 4096,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        context = min(max_context, model.config.max_seq_len)
        self.engine = Engine(
            model, tokenizer, max_batch=1, max_context=context, prefix_cache_tokens=context
        )
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
            text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_bos=self._template_lacks_bos(text))
            if len(ids) <= budget or len(self.turns) <= 1:
                break
            self.turns = self.turns[2:]
            self.dropped_turns += 1
        if len(ids) > limit:
            raise LmforgeError(
                f"the message needs {len(ids)} tokens, more than the chat's context of {limit}"
            )
        return ids

    def _template_lacks_bos(self, text: str) -> bool:
        # Templates such as Llama's write the BOS token themselves; add it only when they don't.
        bos = self.tokenizer.bos_token
        return self.tokenizer.adds_bos and not (bos and text.startswith(bos))

    def stream_reply(self, user_text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply, which joins the history."""
        self.turns.append({"role": "user", "content": user_text})
        try:
            ids = self.prompt_ids()
        except LmforgeError:
            self.turns.pop()
            raise
        pieces = []
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
        elif command.startswith("/"):
            write(f"unknown command {command}; /help lists the commands\n")
        else:
            try:
                before = session.dropped_turns
                for piece in session.stream_reply(line):
                    write(piece)
                write("\n")
                if session.dropped_turns > before:
                    write("(oldest exchanges dropped to fit the context window)\n")
            except LmforgeError as e:
                write(f"error: {e}\n")
