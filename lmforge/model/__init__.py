"""Model code: configuration, Transformer, attention and KV cache. No training concerns here."""

from lmforge.model.attention import KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
