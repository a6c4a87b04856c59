"""Batched steps over sequences that keep their own caches (continuous batching).

Layout: flattened. The new rows of every sequence in the step ([last token] + draft tree, one
row, or a prefill chunk) are concatenated into one [1, N] row batch (N = the sum of the
sequences' rows, no padding) with per-sequence offsets, so the linear layers, where nearly all
the compute is, run once over exactly the rows the step needs: one sequence's draft tree costs
its own rows and nothing for the others. Attention runs per sequence against that sequence's
own KV cache: `BatchCache.update` appends each sequence's slice of the new keys/values to its
own `KVCache` and returns per-sequence key/value lists, which the registered attention function
consumes slice by slice. No cache is ever copied into a batch tensor, caches of different
lengths (and different per-layer lengths after eviction) need nothing special, and a sequence
leaves the batch by simply not being in the next step. On the CPU in fp32 the decode rows and
lookahead trees of a step go to one call per layer of a C++ attention kernel (`tree_attention`
in server/stream_linear.cpp) that reads each cache where it lies, and every part's new rows to
one append call; prefill chunks and caches with padding rows stay on SDPA per sequence.
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
    """A view of several sequences' caches as one transformers Cache for one forward over
    flattened rows: sequence b owns rows offsets[b] : offsets[b] + rows[b]."""

    def __init__(self, caches: list[KVCache], rows: list[int], offsets: list[int], append_rows=None) -> None:
        super().__init__(layers=[])
        self.caches = caches
        self.rows = rows
        self.offsets = offsets
        # parts whose buffers have room append through `append_rows` (the C++ kernel in
        # server/stream_linear.cpp): one call per layer instead of a few ops per sequence
        self.append_rows = append_rows

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """key/value_states [1, H, N, D] → per-sequence lists of all their cached rows."""
        layers = [cache.layers[layer_idx] for cache in self.caches]
        fast = [] if self.append_rows is None else [b for b, t in enumerate(self.rows) if layers[b].room_for(t)]
        if fast:
            bufs = [layers[b].buffers() for b in fast]
            at = [layers[b].length for b in fast]
            starts = [self.offsets[b] for b in fast]
            counts = [self.rows[b] for b in fast]
            self.append_rows(key_states, value_states, [k for k, _ in bufs], [v for _, v in bufs], at, starts, counts)
            for b in fast:
                layers[b].advance(self.rows[b])
        done = set(fast)
        keys, values = [], []
        for b, (layer, lo, t) in enumerate(zip(layers, self.offsets, self.rows, strict=True)):
            if b in done:
                keys.append(layer.keys)
                values.append(layer.values)
                continue
            k, v = layer.update(key_states[:, :, lo : lo + t], value_states[:, :, lo : lo + t])
            keys.append(k)
            values.append(v)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((c.get_seq_length(layer_idx) for c in self.caches), default=0)

    def __len__(self) -> int:
        return len(self.caches[0].layers) if self.caches else 0


# trees of at most this many rows take the attention kernel: a default-size tree (64 draft nodes
# and the last token); up to there it measured as fast as SDPA or faster on 340-row caches (1.1
# against 1.3 ms a layer at 64 rows, 0.09 against 0.21 ms at 4), and it needs no mask built per
# layer. Larger trees (a raised --decoding-length) were not measured: SDPA
MAX_TREE_ROWS = 65


@dataclass
class TreeLayout:
    """Which rows of a step the attention kernel takes and what each sees (`tree_attention` in
    server/stream_linear.cpp): `parts` (indices into the step's parts), per kernel row its part's
    position in `parts` (`row_part`, int64) and which of its part's new rows it sees
    (`visible`, bool [rows, max part rows]: the tree mask; causal without one), and where the
    rows sit in the flattened step (`index`; None: every row of the step, in order)."""

    parts: list[int]
    row_part: torch.Tensor
    visible: torch.Tensor
    index: torch.Tensor | None

    @classmethod
    def of(cls, rows: list[int], offsets: list[int], masks: list, parts: list[int]) -> TreeLayout | None:
        """The layout of `parts` (each of at most MAX_TREE_ROWS rows; masks[b]: bool [T, T] or
        None), or None when there are none."""
        if not parts:
            return None
        counts = [rows[b] for b in parts]
        visible = torch.zeros(sum(counts), max(counts), dtype=torch.bool)
        at = 0
        for b, t in zip(parts, counts, strict=True):
            if masks[b] is None:
                visible[at : at + t, :t] = torch.ones(t, t, dtype=torch.bool).tril_()
            else:
                visible[at : at + t, :t] = masks[b].cpu()
            at += t
        row_part = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(counts))
        index = None
        if len(parts) < len(rows):
            index = torch.cat([torch.arange(offsets[b], offsets[b] + rows[b]) for b in parts])
        return cls(parts, row_part, visible, index)


def row_offsets(rows: list[int]) -> list[int]:
    """Where each sequence's rows start in the flattened batch."""
    offsets, at = [], 0
    for t in rows:
        offsets.append(at)
        at += t
    return offsets


def flatten_rows(parts: list[StepRows], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[1, N] input ids and position ids (every sequence's rows back to back) and the rows per
    sequence."""
    rows = [p.input_ids.numel() for p in parts]
    ids = torch.cat([p.input_ids for p in parts]).unsqueeze(0)
    pos = torch.cat([p.position_ids for p in parts]).unsqueeze(0)
    return ids.to(device), pos.to(device), rows
