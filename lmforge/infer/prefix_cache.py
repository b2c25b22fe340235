"""Prompt-prefix caching: the keys/values of recently seen prompt prefixes (e.g. a shared system
prompt), so a new request prefills only the part of its prompt that was not seen before."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from lmforge.model.attention import SlotKVCache


class PrefixCache:
    """Keys/values of prompt prefixes in blocks of `block` tokens, at most `max_tokens` in all.

    A block is keyed by a digest of every token up to its end, so equal keys mean equal prefixes
    (as in vLLM's automatic prefix caching). Blocks live in one pool allocated up front and are
    evicted least recently used first. A prompt's blocks are touched last to first, so a prefix's
    first block is the most recent and its later blocks go before it (a block whose predecessor
    was evicted could never be reached again).
    """

    def __init__(self, cache: SlotKVCache, max_tokens: int, block: int = 16) -> None:
        if block < 1 or max_tokens < 0:
            raise ValueError(f"need block >= 1 and max_tokens >= 0, got {block} and {max_tokens}")
        self.block, self.capacity = block, max_tokens // block
        layers, _, kv_heads, _, head_dim = cache.k.shape
        shape = (layers, self.capacity, kv_heads, block, head_dim)
        self.k = cache.k.new_zeros(shape)
        self.v = cache.v.new_zeros(shape)
        self.index: OrderedDict[bytes, int] = OrderedDict()  # block key -> pool row, LRU first

    @property
    def tokens(self) -> int:
        """Tokens held now (never more than max_tokens)."""
        return len(self.index) * self.block

    def block_keys(self, ids: list[int]) -> list[bytes]:
        """The key of each full block of `ids`: a digest of all tokens up to the block's end."""
        digest, keys = hashlib.blake2b(digest_size=16), []
        for end in range(self.block, len(ids) + 1, self.block):
            digest.update(array("q", ids[end - self.block : end]).tobytes())
            keys.append(digest.copy().digest())
        return keys

    def load(self, ids: list[int], cache: SlotKVCache, slot: int) -> int:
        """Copy the longest cached prefix of `ids` into `slot`; return its length in tokens."""
        keys, rows = self.block_keys(ids), []
        for key in keys:
            if key not in self.index:
                break
            rows.append(self.index[key])
        if not rows:
            return 0
        self._touch(keys[: len(rows)])
        n = len(rows) * self.block
        index = torch.tensor(rows, device=self.k.device)
        # (layers, blocks, kv, block, D) -> (layers, kv, blocks * block, D) in one copy each.
        for pool, dst in ((self.k, cache.k), (self.v, cache.v)):
            blocks = pool[:, index].transpose(1, 2)
            dst[:, slot, :, :n] = blocks.reshape(*blocks.shape[:2], n, blocks.shape[-1])
        return n

    def store(self, ids: list[int], cache: SlotKVCache, slot: int) -> None:
        """Remember the full blocks of `ids`, whose keys/values are in `slot`."""
        keys = self.block_keys(ids)[: self.capacity]
        # Touch the blocks already held first, so making room evicts other prompts' blocks.
        self._touch([key for key in keys if key in self.index])
        for i, key in reversed(list(enumerate(keys))):
            if key in self.index:
                continue
            if len(self.index) < self.capacity:
                row = len(self.index)
            else:
                _, row = self.index.popitem(last=False)
            span = slice(i * self.block, (i + 1) * self.block)
            self.k[:, row] = cache.k[:, slot, :, span]
            self.v[:, row] = cache.v[:, slot, :, span]
            self.index[key] = row
        self._touch(keys)

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):
            self.index.move_to_end(key)
