"""Train a byte-level BPE tokenizer (GPT-2 style) on an iterable of texts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.tokenizer.tokenizer import Tokenizer

# bos/eos/pad for pretraining; <|im_start|>/<|im_end|> are the ChatML role markers for chat tuning.
DEFAULT_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
) -> Tokenizer:
    """Learn `vocab_size` tokens: 256 byte symbols, the special tokens, then BPE merges."""
    special_tokens = list(dict.fromkeys(special_tokens))
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} "
            f"(256 byte symbols + {len(special_tokens)} special tokens)"
        )
    backend = Backend(models.BPE())
    # GPT-2 (Radford et al. 2019): split with its regex, map every byte to a printable symbol; with
    # all 256 symbols in the initial alphabet any Unicode string encodes and decodes back exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)
