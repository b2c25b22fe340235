"""Tokenizers: the `Tokenizer` wrapper and byte-level BPE training."""

from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import DEFAULT_SPECIAL_TOKENS, train_bpe

__all__ = ["DEFAULT_SPECIAL_TOKENS", "Tokenizer", "train_bpe"]
