"""A position-indexed KV cache that HF models write into through the `Cache` interface.

Each layer keeps preallocated buffers [B, H, capacity, D] that grow by doubling, so a decode
step writes its rows in place instead of concatenating (and copying) the whole cache. Rejecting
draft rows is a length change; keeping a non-contiguous accepted path gathers at most `depth`
rows; eviction replaces a layer's buffers with the kept rows (memory really drops).

Layers may hold different lengths after layer-wise eviction: logical positions live with the
sequence, not here, and attention sees exactly the rows each layer holds.

Per-head budgets (AdaKV style: the KV heads of a layer keep different numbers of rows) pad every
head to the layer's largest count; `valid` (bool [B, H, capacity]) marks the padding rows, which
attention and later scoring must skip (`valid_rows()`). Memory counts the padding (`nbytes`);
`kept_rows()` counts only real entries.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer
from trieserve.kernels.compact_kv import compact_kv

MIN_CAPACITY = 64


class GrowableLayer(DynamicLayer):
    """One layer's keys and values: buffers [B, H, capacity, D] of which `length` rows are live."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        # None: capacity doubles when full. After eviction, rows: grow by the rows needed plus
        # this many, so an evicted layer stays near its budget instead of doubling it.
        self.grow_by: int | None = None
        self._valid: torch.Tensor | None = None  # bool [B, H, capacity]; None: every live row is real

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._allocate(key_states.shape[:2], key_states.shape[-1], max(MIN_CAPACITY, key_states.shape[-2]))
        self.is_initialized = True

    def _allocate(self, bh: torch.Size, head_dim: int, capacity: int) -> None:
        shape = (*bh, capacity, head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self._k is not None and self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        if self._valid is not None:
            valid = torch.ones(*bh, capacity, dtype=torch.bool, device=self.device)
            valid[:, :, : self.length] = self._valid[:, :, : self.length]
            self._valid = valid
        self._k, self._v = k, v

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def _sync_views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, H, T, D] rows; return views of all live rows [B, H, length, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            if self.grow_by is None:
                capacity = max(2 * self.capacity, self.length + n)
            else:
                capacity = self.length + n + self.grow_by
            self._allocate(self._k.shape[:2], self._k.shape[-1], capacity)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        if self._valid is not None:  # new rows are real in every head (they may reuse padding slots)
            self._valid[:, :, self.length : self.length + n] = True
        self.length += n
        self._sync_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def room_for(self, rows: int) -> bool:
        """Whether `rows` more rows can be written straight into the buffers (`buffers`, then
        `advance`): initialised, with the room, and no padding bookkeeping to keep."""
        return self.is_initialized and self._valid is None and self.length + rows <= self.capacity

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers [B, H, capacity, D] (rows past `length` are free)."""
        return self._k, self._v

    def advance(self, rows: int) -> None:
        """Count `rows` rows written into the buffers past `length` as live."""
        if self.length + rows > self.capacity:
            raise ValueError(
                f"cannot advance a layer of {self.length} rows by {rows} past its capacity {self.capacity}"
            )
        self.length += rows
        self._sync_views()

    def reserve(self, rows: int) -> None:
        """Room for `rows` live rows in the buffers now, so appending up to them copies
        nothing (an initialised layer; a prefix-cache hit knows the prompt's length)."""
        if self.is_initialized and rows > self.capacity:
            self._allocate(self._k.shape[:2], self._k.shape[-1], rows)

    def valid_rows(self) -> torch.Tensor | None:
        """bool [B, H, length]: which live rows are real entries (False: a padding row of a head
        that kept fewer rows than the layer holds); None when every row is real."""
        return None if self._valid is None else self._valid[:, :, : self.length]

    def kept_rows(self) -> float:
        """Real entries per KV head, averaged over heads (and batch)."""
        valid = self.valid_rows()
        return float(self.length) if valid is None else valid.sum().item() / max(valid.shape[0] * valid.shape[1], 1)

    def truncate(self, length: int) -> None:
        """Drop rows from `length` on (rejected draft rows)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a layer of {self.length} rows to {length}")
        self.length = length
        if self.is_initialized:
            self._sync_views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of rows to remove")
        self.truncate(self.length + tokens_to_remove)

    @torch.no_grad()
    def keep_rows(self, start: int, rows: torch.Tensor) -> None:
        """Keep rows `rows` (absolute indices >= start, ascending) at start.., drop the rest."""
        k = rows.numel()
        # index_select copies the (few) source rows first, so overlapping source/target is safe;
        # no_grad: the buffers are plain tensors and this runs outside the forward.
        self._k[:, :, start : start + k] = self._k.index_select(2, rows)
        self._v[:, :, start : start + k] = self._v.index_select(2, rows)
        if self._valid is not None:  # the kept rows are new rows: real in every head
            self._valid[:, :, start : start + k] = True
        self.truncate(start + k)

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Swap in compacted rows [B, H, K, D] (eviction): the old buffers are freed."""
        self._k, self._v = keys.contiguous(), values.contiguous()
        self._valid = None
        self.length = keys.shape[2]
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self._sync_views()

    @torch.no_grad()
    def compact(self, index: torch.Tensor, reserve: int = 0) -> None:
        """Eviction: keep rows `index` (int64 [B, H, K], ascending per head; -1 marks a padding
        slot of a head that keeps fewer rows) in new buffers of capacity K + `reserve`; the old
        buffers are freed. Later growth adds the rows needed plus max(reserve, MIN_CAPACITY)
        (see `grow_by`)."""
        B, H, K = index.shape
        valid = index >= 0
        old_valid = self.valid_rows()
        if old_valid is not None:  # a padding row kept again stays padding
            valid &= old_valid.gather(2, index.clamp(min=0).to(old_valid.device)).to(valid.device)
        index = index.clamp(min=0)
        keys = torch.empty(B, H, K + reserve, self._k.shape[-1], dtype=self.dtype, device=self.device)
        values = torch.empty(B, H, K + reserve, self._v.shape[-1], dtype=self.dtype, device=self.device)
        compact_kv(self.keys, self.values, index.to(self.device), out_k=keys[:, :, :K], out_v=values[:, :, :K])
        self.replace(keys, values)
        if not bool(valid.all()):
            self._valid = torch.ones(B, H, K + reserve, dtype=torch.bool, device=self.device)
            self._valid[:, :, :K] = valid.to(self.device)
        self.truncate(K)
        self.grow_by = max(reserve, MIN_CAPACITY)

    def nbytes(self) -> int:
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes


class KVCache(Cache):
    """Per-sequence cache: one GrowableLayer per decoder layer."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[GrowableLayer() for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def total_rows(self) -> int:
        """Real cached entries over all layers and KV heads (padding rows not counted)."""
        return round(
            sum(layer.kept_rows() * (layer._k.shape[1] if layer._k is not None else 0) for layer in self.layers)
        )

    def truncate_new(self, n_new: int, keep: int) -> None:
        """After a step that appended `n_new` rows to every layer, keep only the first `keep` of them."""
        if keep == n_new:  # a plain step, or a whole chain accepted: nothing to drop
            return
        for layer in self.layers:
            layer.truncate(layer.length - n_new + keep)

    def keep_path(self, n_new: int, rows: list[int]) -> None:
        """After a tree step that appended `n_new` packed rows to every layer, keep the rows whose
        packed indices are `rows` (row 0 first, then the accepted path, ascending). A slice when the
        rows are 0..k-1, otherwise a gather of len(rows) rows per layer."""
        if rows == list(range(len(rows))):
            self.truncate_new(n_new, len(rows))
            return
        for layer in self.layers:
            start = layer.length - n_new
            index = torch.tensor([start + r for r in rows], device=layer.device)
            layer.keep_rows(start, index)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def mean_length(self) -> float:
        """Real entries per layer and KV head, averaged (what `stats` reports as kept); with
        per-head budgets this is below the rows held, which `nbytes` counts."""
        return sum(layer.kept_rows() for layer in self.layers) / max(len(self.layers), 1)
