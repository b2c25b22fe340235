"""One sequence's generation state: its new tokens, incremental text, stop ids and strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol


class TextDecoder(Protocol):
    """The part of a tokenizer that generation uses."""

    @property
    def eos_id(self) -> int | None: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Generation:
    """The continuation of one prompt: new tokens (stop token excluded) and their text."""

    tokens: list[int]
    text: str | None
    finish_reason: Literal["stop", "length"]


class Detokenizer:
    """Turns a growing list of ids into text, decoding only a short window at the end.

    The window starts one step before the unread ids because tokenizers such as SentencePiece
    render a token differently at the start of a text (no leading space); the text of the window's
    already-read part is subtracted. Text ending in U+FFFD is held back: a multi-byte character
    is split across tokens and the next token completes it.
    """

    def __init__(self, tokenizer: TextDecoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # window start
        self.read = 0  # ids[:read] have been turned into text

    def push(self, token: int) -> str:
        """Add a token; return the text that became printable (often "")."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back text at the end of generation (may contain U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        done = self.tokenizer.decode(self.ids[self.start : self.read])
        window = self.tokenizer.decode(self.ids[self.start :])
        if window.endswith("\ufffd") and not final:
            return ""
        self.start, self.read = self.read, len(self.ids)
        return window[len(done) :]


class SequenceState:
    """One prompt's generation state: new tokens, their text so far and why it stopped."""

    def __init__(
        self,
        prompt: list[int],
        max_new: int,
        stop_ids: set[int],
        stop_strings: Sequence[str],
        tokenizer: TextDecoder | None,
    ) -> None:
        self.prompt, self.max_new = prompt, max_new
        self.stop_ids, self.stop_strings = stop_ids, stop_strings
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: Literal["stop", "length"] | None = None

    def push(self, token: int) -> bool:
        """Record the next token; return True once the sequence is finished."""
        if token in self.stop_ids:
            return self._finish("stop")
        self.tokens.append(token)
        if self.detokenizer is not None:
            piece = self.detokenizer.push(token)
            self.text += piece
            if piece and self.stop_strings and self._cut_at_stop_string(len(piece)):
                return True
        if len(self.tokens) == self.max_new:
            return self._finish("length")
        return False

    def _cut_at_stop_string(self, new_chars: int) -> bool:
        # Earlier text was checked on previous steps, so only matches ending in the new chars count.
        longest = max(len(s) for s in self.stop_strings)
        start = max(0, len(self.text) - new_chars - longest + 1)
        hits = [i for s in self.stop_strings if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish_reason = "stop"
        return True

    def _finish(self, reason: Literal["stop", "length"]) -> bool:
        if self.detokenizer is not None:
            self.text += self.detokenizer.flush()
        self.finish_reason = reason
        return True


def partial_stop_string(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
