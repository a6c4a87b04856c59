"""Automatic prefix caching: prompts that begin alike skip the shared part of their prefill.

A prompt's KV rows depend only on the tokens up to them (causal attention, logical positions
from 0), so the rows of a prefix computed for one request serve every later prompt that starts
with the same tokens: a chat's system prompt, earlier turns of a conversation, a document asked
about again. The store keeps them in blocks of `block` tokens, each keyed by a hash of the whole
token prefix up to its end (a chain: block i's key hashes block i-1's key and its own tokens), so
a lookup walks the prompt's blocks and stops at the first it does not hold. Only full blocks are
stored, and a lookup leaves at least one prompt token to compute (the first token's logits come
from it). Blocks are evicted least recently used first when the store passes its byte budget,
and within a chain its deepest block first, so what stays is always a reachable prefix; a prompt
longer than the budget keeps its leading blocks.

What is stored is a copy (one [layers, 2, kv heads, block, head dim] tensor per block), taken
from a full-cache prefill when it completes, before decoding appends anything; a hit copies the
blocks once into the new sequence's own cache, sized for the whole prompt, so sequences never share buffers and eviction, draft
fix-ups and cancellation stay per sequence. Prefills that evict (DefensiveKV and the other
policies) neither read nor feed the store: their caches do not hold the prompt's rows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch
from trieserve.cache.kv import KVCache

DEFAULT_BLOCK = 32


def block_keys(tokens: list[int], block: int, limit: int | None = None) -> list[bytes]:
    """The chain keys of the first full blocks of `tokens` (those ending at or before `limit`)."""
    end = len(tokens) if limit is None else min(limit, len(tokens))
    keys, prev = [], b""
    for lo in range(0, end - block + 1, block):
        prev = hashlib.blake2b(prev + array("q", tokens[lo : lo + block]).tobytes(), digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixCache:
    """Blocks of prompt KV rows shared across requests, bounded by `capacity_bytes` (LRU)."""

    def __init__(self, capacity_bytes: int, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.capacity_bytes = capacity_bytes
        self.block = block
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens served from the store, since start
        self.queried_tokens = 0  # prompt tokens looked up

    def __len__(self) -> int:
        return len(self.blocks)

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain used, its deepest block least recent: eviction takes a chain's tail
        before its head, so what stays is always a reachable prefix."""
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def load(self, cache: KVCache, prompt_ids: list[int]) -> int:
        """Copy the longest stored prefix of `prompt_ids` (whole blocks, leaving at least one
        token) into the empty `cache`; returns how many tokens it covers."""
        if any(layer.length for layer in cache.layers):
            raise ValueError("a prefix is loaded into an empty cache only")
        self.queried_tokens += len(prompt_ids)
        keys, found = [], []
        for key in block_keys(prompt_ids, self.block, limit=len(prompt_ids) - 1):
            data = self.blocks.get(key)
            if data is None:
                break
            keys.append(key)
            found.append(data)
        if not found:
            return 0
        self._touch(keys)
        for i, layer in enumerate(cache.layers):  # each block copied once, into room for the whole prompt
            for j, data in enumerate(found):  # data: [L, 2, H, block, D]
                layer.update(data[i, 0].unsqueeze(0), data[i, 1].unsqueeze(0))
                if j == 0:
                    layer.reserve(len(prompt_ids))
        covered = len(found) * self.block
        self.hit_tokens += covered
        return covered

    def store(self, cache: KVCache, prompt_ids: list[int]) -> int:
        """Add the leading full blocks of a just-prefilled prompt that the store lacks, as many
        as the budget holds (the cache must hold exactly the prompt's rows, every one real);
        older chains' tails make room first, never this prompt's own blocks. Returns how many
        blocks were added."""
        if any(layer.length != len(prompt_ids) or layer.valid_rows() is not None for layer in cache.layers):
            raise ValueError("only a full cache holding exactly the prompt's rows can be stored")
        keys = block_keys(prompt_ids, self.block)
        if not keys or self.capacity_bytes <= 0:
            return 0
        per_block = sum(2 * layer.keys[0, :, : self.block].nbytes for layer in cache.layers)
        keys = keys[: self.capacity_bytes // per_block]
        chain = set(keys)
        added = 0
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            lo, hi = i * self.block, (i + 1) * self.block
            data = torch.stack(
                [torch.stack((layer.keys[0, :, lo:hi], layer.values[0, :, lo:hi])) for layer in cache.layers]
            )
            while self.nbytes + data.nbytes > self.capacity_bytes:
                old = next(k for k in self.blocks if k not in chain)  # exists: the chain fits the budget
                self.nbytes -= self.blocks.pop(old).nbytes
            self.blocks[key] = data
            self.nbytes += data.nbytes
            added += 1
        self._touch(keys)
        return added

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0
