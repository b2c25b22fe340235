"""lmforge: the whole life of a large language model in one small PyTorch package."""

from lmforge.errors import LmforgeError
from lmforge.loading import load, load_tokenizer
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "LmforgeError",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "load",
    "load_tokenizer",
]
