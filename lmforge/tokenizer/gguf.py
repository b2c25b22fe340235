"""Tokenizers rebuilt from GGUF metadata (`tokenizer.ggml.*`), matching llama.cpp's tokenization.

Two vocabulary kinds cover the llama.cpp model zoo:
- "gpt2": byte-level BPE with ranked merges; the pre-tokenizer regexes depend on
  `tokenizer.ggml.pre` and are the ones llama.cpp applies for that name (llama-vocab.cpp), each
  splitting the pieces of the one before.
- "llama": SentencePiece BPE with scores and <0xXX> byte fallback; a pair merges earlier the higher
  the score of the merged token, so the merge ranks are the vocabulary sorted by that score.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from lmforge.errors import CheckpointError
from lmforge.tokenizer.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.h, enum llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_FAMILIES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion"): (_GPT2,),
    ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"): (
        r"\p{N}",  # digits one by one, then the GPT-2 split
        _GPT2,
    ),
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "chatglm-bpe"): (_LLAMA3,),
    ("qwen2", "qwen2.5", "stablelm2", "deepseek-r1-qwen", "hunyuan", "megrez"): (_QWEN2,),
    ("default",): (
        r"[\p{P}\$\+<=>\^~\|]+",
        _GPT2,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ),
}
PRE_TOKENIZERS = {name: regexes for names, regexes in _FAMILIES.items() for name in names}
# llama.cpp keeps a whole pre-tokenized word as one token when it is in the vocabulary (Llama 3).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"}


def tokenizer_from_gguf(meta: dict[str, Any], source: str = "GGUF file") -> Tokenizer:
    """The Tokenizer described by a GGUF file's metadata, with its chat template and specials."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise CheckpointError(f"{source} has no tokenizer (tokenizer.ggml.model / .tokens)")
    types = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise CheckpointError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens, source)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta, tokens, types, source)
    else:
        raise CheckpointError(
            f"{source}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
            for i in range(len(tokens))
            if types[i] in (CONTROL, USER_DEFINED)
        ]
    )

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return Tokenizer(
        backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        # llama.cpp's default when the key is absent: SentencePiece vocabularies add BOS.
        add_bos_token=bool(add_bos) if add_bos is not None else kind == "llama",
    )


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], source: str) -> Backend:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{source}: pre-tokenizer {pre!r} is not supported; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    merges = []
    for merge in meta.get("tokenizer.ggml.merges", []):
        # llama.cpp splits at the first space after the first character (a merge of " " exists).
        cut = merge.find(" ", 1)
        if cut < 0:
            raise CheckpointError(f"{source}: malformed merge {merge!r}")
        merges.append((merge[:cut], merge[cut + 1 :]))
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    meta: dict[str, Any], tokens: list[str], types: list[int], source: str
) -> Backend:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{source}: a SentencePiece vocabulary needs one score per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, types, strict=True) if kind in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-float(scores[vocab[piece]]), vocab[piece], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    backend = Backend(
        models.BPE(vocab, merges, unk_token=unk_token, byte_fallback=True, fuse_unk=True)
    )
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return backend
