"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` plus special ids and chat.

Any HF `tokenizer.json` (BPE, WordPiece, Unigram) loads as it is; `tokenizer_config.json` supplies
the bos/eos/pad tokens and the Jinja chat template the way `transformers` writes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import CheckpointError, LmforgeError

# Used only when no tokenizer_config.json names the tokens: the spellings of common model families.
BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>")
EOS_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")


class Tokenizer:
    """Encode/decode text with explicit bos/eos handling and an optional chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        add_bos_token: bool | None = None,
    ) -> None:
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.bos_token = bos_token or next((t for t in BOS_NAMES if t in vocab), None)
        self.eos_token = eos_token or next((t for t in EOS_NAMES if t in vocab), None)
        self.pad_token = pad_token or next((t for t in PAD_NAMES if t in vocab), None)
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.add_bos_token = add_bos_token

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a directory holding `tokenizer.json` (+ optional `tokenizer_config.json`) or the file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for every failure
            raise CheckpointError(f"cannot load tokenizer from {file}: {e}") from None
        # A tokenizer.json may carry a pipeline's padding/truncation (all-MiniLM-L6-v2 pads every
        # text to 128): encode() returns a text's own ids; batching pads and cuts explicitly.
        backend.no_padding()
        backend.no_truncation()
        config_file = file.parent / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:
                raise CheckpointError(f"cannot read {config_file}: {e}") from None
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            chat_template=_pick_template(config.get("chat_template")),
            model_max_length=config.get("model_max_length"),
            add_bos_token=config.get("add_bos_token"),
        )

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and an HF-compatible `tokenizer_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        keys = ("bos_token", "eos_token", "pad_token", "chat_template", "model_max_length")
        for key in (*keys, "add_bos_token"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def adds_bos(self) -> bool:
        """Whether a plain prompt starts with BOS: the model's own rule (`add_bos_token`, e.g.
        false for SmolLM2 and Qwen2), else yes whenever there is a BOS token."""
        if self.add_bos_token is not None:
            return self.add_bos_token and self.bos_id is not None
        return self.bos_id is not None

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def sha256(self) -> str:
        """Fingerprint of the serialized tokenizer, so token shards can be matched to it."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; the backend's own post-processor specials are never added."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once on all cores (the Rust backend parallelizes the batch)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(
        self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = False
    ) -> list[str]:
        batch = [list(ids) for ids in batch]
        return self.backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the Jinja chat template, or ChatML when there is none."""
        if self.chat_template is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_template_error
            try:
                return env.from_string(self.chat_template).render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                )
            except TemplateError as e:
                raise LmforgeError(f"the chat template failed to render: {e}") from None
        if self.token_to_id("<|im_start|>") is None or self.token_to_id("<|im_end|>") is None:
            raise LmforgeError(
                "this tokenizer has no chat template and no ChatML tokens (<|im_start|>, "
                "<|im_end|>); add a chat_template to tokenizer_config.json or retrain with them"
            )
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self._require(self.bos_id, "bos"), *ids]
        if add_eos:
            ids = [*ids, self._require(self.eos_id, "eos")]
        return ids

    @staticmethod
    def _require(id: int | None, name: str) -> int:
        if id is None:
            raise LmforgeError(
                f"this tokenizer has no {name} token; set {name}_token in its config"
            )
        return id


def _token_content(value: str | dict | None) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _pick_template(value: str | list | None) -> str | None:
    # Some configs hold several named templates; "default" is the one used for plain chat.
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default", next(iter(named.values()), None))
    return value


def _raise_template_error(message: str) -> None:
    raise LmforgeError(f"chat template error: {message}")
