"""Eviction during prefill: capture the observation window's queries, score, compact.

How the window's attention is obtained: the model runs with trieserve's registered attention
function (transformers' `AttentionInterface`). The runner passes a `WindowCapture` as a keyword
argument of the forward call; transformers hands every layer's attention call its keyword
arguments, and the function records that layer's post-RoPE `query[:, :, -W:]` (a copy: W rows,
not the chunk). Nothing is patched. After the chunk's forward the layer's cache holds all its keys,
the window's last; `eviction_scores` recomputes the window's softmax over them (fp32) with the
policy's aggregation. Recomputing W x S logits per layer is cheap next to the forward, and it
needs neither attention probabilities from the model (SDPA never materialises them) nor a second
pass over the prompt.

Repeated compression (bounded peak memory): prefill runs in chunks, each at least W tokens long.
After every chunk, layers holding more than `keep + slack` rows are scored with that chunk's
last W queries and compacted to the budget, with room reserved for the next chunk. Peak KV memory
is then about (keep + chunk) rows per layer, not the whole prompt. The last chunk's window is the
prompt's own observation window, and the final compaction brings every layer to the budget. A
prompt that fits in one chunk is compressed once, after the whole prompt (SnapKV's setting); a
longer one is compressed as it streams in, by every scored policy alike (one code path). The
published DefensiveKV code compresses once only, so its peak is the full prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trieserve.cache.kv import KVCache
from trieserve.cache.policies import EvictionPolicy, make_policy

MIN_EVICTED_PREFIX = 8  # prompts shorter than window + this are left alone
DECODE_HEADROOM = 64  # rows reserved after the final compaction (decode / draft trees grow into it)


@dataclass
class WindowCapture:
    """Filled by the attention function during one forward: per layer, the last `window`
    queries [B, Hq, W, D] (post-RoPE), the softmax scale, and the layer's output projection
    weight [M, Hq * D] where the attention module has one (value-aware scores use it)."""

    window: int
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)
    out_proj: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(
        self, layer_idx: int, query: torch.Tensor, scaling: float | None, out_proj: torch.Tensor | None = None
    ) -> None:
        if query.shape[2] < self.window:
            raise ValueError(f"a chunk of {query.shape[2]} tokens cannot hold a window of {self.window}")
        self.queries[layer_idx] = query[:, :, -self.window :].clone()
        self.scaling[layer_idx] = scaling if scaling is not None else query.shape[-1] ** -0.5
        if out_proj is not None:
            self.out_proj[layer_idx] = out_proj  # the model's own weight: a reference, not a copy


@dataclass(frozen=True)
class Eviction:
    """What prefill should keep: a policy, a budget and the observation window.

    budget: a fraction of the prompt's tokens (<= 1) or a token count (> 1), window included;
    never more than the prompt, never less than the window. Evicting again during decoding
    (`kv_regrow`) takes the same budget over everything seen, prompt and output. slack: rows a layer may hold above
    the budget before an intermediate (not final) chunk compacts it."""

    policy: EvictionPolicy
    budget: float
    window: int = 32
    slack: int = 0

    def __post_init__(self) -> None:
        if not self.budget > 0 or math.isnan(self.budget):
            raise ValueError(f"kv budget must be > 0, got {self.budget}")
        if self.window < 1:
            raise ValueError(f"kv window must be >= 1, got {self.window}")

    def keep(self, prompt_len: int) -> int:
        """Rows per layer (and KV head) kept after prefill, window included."""
        tokens = math.floor(self.budget * prompt_len + 0.5) if self.budget <= 1 else int(self.budget)
        return min(prompt_len, max(self.window, tokens))

    def applies(self, prompt_len: int, start: int = 0) -> bool:
        """Whether prefilling tokens [start, prompt_len) evicts anything."""
        return (
            self.policy.evicts
            and prompt_len >= self.window + MIN_EVICTED_PREFIX
            and prompt_len - start >= self.window
            and self.keep(prompt_len) < prompt_len
        )


def eviction_for(policy: str, budget: float, window: int, slack: int = 0) -> Eviction | None:
    """The Eviction a request asks for by name; None for the full cache."""
    chosen = make_policy(policy)
    return Eviction(chosen, budget, window, slack) if chosen.evicts else None


@dataclass
class PrefillTrace:
    """What one prefill did to the cache: KV bytes at their peak (after a chunk's forward,
    before its compaction) and at the end, and how many layer compactions ran."""

    peak_bytes: int = 0
    final_bytes: int = 0
    compactions: int = 0
    chunks: int = 0

    def observe(self, cache: KVCache) -> None:
        self.chunks += 1
        self.peak_bytes = max(self.peak_bytes, cache.nbytes())


def chunk_bounds(start: int, end: int, chunk: int, min_len: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) chunks of `chunk` tokens covering start..end, each at least `min_len` long where
    possible: a short tail joins the chunk before it (so the last chunk holds the whole window)."""
    chunk = max(chunk, min_len)
    bounds = [(lo, min(lo + chunk, end)) for lo in range(start, end, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_len:
        bounds[-2:] = [(bounds[-2][0], end)]
    return bounds


@torch.no_grad()
def compress(
    cache: KVCache,
    policy: EvictionPolicy,
    capture: WindowCapture | None,
    keep: int,
    window: int,
    slack: int = 0,
    reserve: int = 0,
) -> dict[int, torch.Tensor]:
    """Compact every layer holding more than `keep + slack` rows to `keep` (window included; a
    global-budget policy redistributes the total across all layers). The last `window` rows of
    each layer must be the window whose queries `capture` holds. Returns the rows each compacted
    layer kept: layer -> int64 [B, Hkv, K_l], indices into the rows it held before."""
    lengths = cache.lengths()
    over = [i for i, n in enumerate(lengths) if n > keep + slack]
    if not over:
        return {}
    layers = [i for i, n in enumerate(lengths) if n > window] if policy.global_budget else over
    scores = {}
    for i in layers:
        q_win = capture.queries.get(i) if capture is not None else None
        scaling = capture.scaling.get(i, 1.0) if capture is not None else 1.0
        out_proj = capture.out_proj.get(i) if capture is not None else None
        layer = cache.layers[i]
        scores[i] = policy.score(
            q_win, layer.keys, scaling, window, layer.valid_rows(), values=layer.values, out_proj=out_proj
        )
    plan = policy.plan(scores, keep, window)
    for i, index in plan.items():
        cache.layers[i].compact(index, reserve)
    return plan
