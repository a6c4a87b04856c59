"""Batched steps over sequences that keep their own caches (continuous batching).

Layout: the new rows of every sequence in the step ([last token] + draft tree, or one row, or a
prefill chunk) are padded into one [B, T_max] batch, so the linear layers, where nearly all
the compute is, run once for the whole batch. Attention runs per sequence against that
sequence's own KV cache: `BatchCache.update` appends each sequence's real rows to its own
`KVCache` and returns per-sequence key/value lists, which the registered attention function
consumes. No cache is ever copied into a padded batch tensor, caches of different lengths (and
different per-layer lengths after eviction) need nothing special, and a sequence leaves the
batch by simply not being in the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from trieserve.cache.kv import KVCache


@dataclass
class StepRows:
    """One sequence's part of a batched step: T rows, their logical positions, and which of
    them see which (bool [T, T]; None = causal)."""

    input_ids: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [T] long
    tree_mask: torch.Tensor | None
    logits_rows: slice | None = None  # rows whose logits are needed (None = all)


class BatchCache(Cache):
    """A view of several sequences' caches as one transformers Cache for one forward."""

    def __init__(self, caches: list[KVCache], rows: list[int]) -> None:
        super().__init__(layers=[])
        self.caches = caches
        self.rows = rows

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """key/value_states [B, H, T_max, D] → per-sequence lists of all their cached rows."""
        keys, values = [], []
        for b, cache in enumerate(self.caches):
            t = self.rows[b]
            k, v = cache.layers[layer_idx].update(key_states[b : b + 1, :, :t], value_states[b : b + 1, :, :t])
            keys.append(k)
            values.append(v)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((c.get_seq_length(layer_idx) for c in self.caches), default=0)

    def __len__(self) -> int:
        return len(self.caches[0].layers) if self.caches else 0


def pad_rows(parts: list[StepRows], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[B, T_max] input ids and position ids; padded rows repeat the last real position (their
    outputs are discarded and their keys never reach a cache)."""
    rows = [p.input_ids.numel() for p in parts]
    t_max = max(rows)
    ids = torch.zeros(len(parts), t_max, dtype=torch.long)
    pos = torch.zeros(len(parts), t_max, dtype=torch.long)
    for b, p in enumerate(parts):
        ids[b, : rows[b]] = p.input_ids
        pos[b, : rows[b]] = p.position_ids
        pos[b, rows[b] :] = p.position_ids[-1]
    return ids.to(device), pos.to(device), rows
