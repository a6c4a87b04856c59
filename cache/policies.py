"""KV eviction policies: which cached rows each KV head keeps.

Shapes: B batch, Hq query heads, Hkv KV heads, W observation window (the last W rows of a
layer, always kept), S rows a layer holds, P = S - W scored prefix rows, K kept rows.

A policy does two things:

- `score(q_win, keys, scaling, window)`: one fp32 score per prefix row [B, Hkv, P] (higher = keep).
  Attention-based policies call `trieserve.kernels.eviction_scores` with their aggregation.
- `plan(scores, keep, window)`: per layer, the index [B, Hkv, K] of rows every KV head keeps
  (ascending, the window's W rows last). The base class keeps a uniform `keep` rows per layer
  (window included), each KV head choosing its own top rows; a policy can override
  `layer_budgets` to spread the total differently across layers.

Adding a policy is one small class and one line in `POLICIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from trieserve.kernels.eviction_scores import eviction_scores


def top_rows(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores per (batch, head), ascending. scores fp32 [B, H, P] ->
    int64 [B, H, n]. Ties go to the later (more recent) row, so the choice is deterministic."""
    P = scores.shape[-1]
    order = scores.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :n]
    return (P - 1 - order).sort(dim=-1).values


def with_window(prefix_index: torch.Tensor, prefix_len: int, window: int) -> torch.Tensor:
    """Append the window rows P..P+W-1 to every head's kept prefix rows [B, H, n]."""
    B, H, _ = prefix_index.shape
    win = torch.arange(prefix_len, prefix_len + window, device=prefix_index.device)
    return torch.cat([prefix_index, win.expand(B, H, window)], dim=-1)


class EvictionPolicy:
    """Base class: per-KV-head top-k of `score` plus the window, `keep` rows per layer."""

    name: ClassVar[str]
    evicts: ClassVar[bool] = True  # False: the cache is left exactly as prefill wrote it
    needs_queries: ClassVar[bool] = True  # scores need the window's queries
    global_budget: ClassVar[bool] = False  # budgets depend on every layer's scores at once

    def score(
        self, q_win: torch.Tensor | None, keys: torch.Tensor, scaling: float, window: int
    ) -> torch.Tensor:
        """q_win [B, Hq, W, D] (None when `needs_queries` is False), keys [B, Hkv, S, D] whose
        last W = `window` rows are the window's -> fp32 [B, Hkv, S - W]."""
        raise NotImplementedError

    def layer_budgets(self, scores: dict[int, torch.Tensor], keep: int, window: int) -> dict[int, int]:
        """Rows (window included) each scored layer keeps; uniform by default."""
        return {layer: min(keep, s.shape[-1] + window) for layer, s in scores.items()}

    def plan(self, scores: dict[int, torch.Tensor], keep: int, window: int) -> dict[int, torch.Tensor]:
        """scores: layer -> fp32 [B, Hkv, P_l]; keep: rows per layer (window included) on average.
        Returns layer -> int64 [B, Hkv, K_l] for the layers that shrink (K_l < P_l + W)."""
        if keep < window:
            raise ValueError(f"keep={keep} must be at least the window ({window})")
        out = {}
        for layer, k in self.layer_budgets(scores, keep, window).items():
            s = scores[layer]
            if k < s.shape[-1] + window:
                out[layer] = with_window(top_rows(s, k - window), s.shape[-1], window)
        return out


@dataclass
class FullCache(EvictionPolicy):
    """No eviction: every prompt row stays (the reference the others are measured against)."""

    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False

    def score(self, q_win, keys, scaling, window):
        return torch.ones(*keys.shape[:2], keys.shape[2] - window, device=keys.device)

    def plan(self, scores, keep, window):
        return {}


@dataclass
class StreamingPolicy(EvictionPolicy):
    """StreamingLLM ("Efficient Streaming Language Models with Attention Sinks", Xiao et al.,
    2023): keep the first `sinks` rows and the most recent ones; no attention needed."""

    name: ClassVar[str] = "streaming"
    needs_queries: ClassVar[bool] = False
    sinks: int = 4

    def score(self, q_win, keys, scaling, window):
        B, H, S = keys.shape[:3]
        P = S - window
        pos = torch.arange(P, dtype=torch.float32, device=keys.device)
        pos[: self.sinks] = float("inf")
        return pos.expand(B, H, P)


@dataclass
class SnapKVPolicy(EvictionPolicy):
    """SnapKV ("SnapKV: LLM Knows What You are Looking for Before Generation", Li et al., 2024):
    pooled window attention averaged over window queries and GQA group heads."""

    name: ClassVar[str] = "snapkv"
    aggregation: ClassVar[str] = "mean"
    pool_kernel: int = 5

    def score(self, q_win, keys, scaling, window):
        if q_win is None or q_win.shape[2] != window:
            raise ValueError(f"{self.name} needs the window's {window} queries")
        return eviction_scores(q_win, keys, scaling, self.aggregation, self.pool_kernel)


@dataclass
class DefensivePolicy(SnapKVPolicy):
    """DefensiveKV ("Taming the Fragility of KV Cache Eviction in LLM Inference", Feng et al.,
    2025): max over window queries and group heads, floored at the head's mean (worst-case
    instead of average importance); per-KV-head top-k. Within one head the floor only ties the
    rows below the mean (ties go to recent rows); it matters where heads or layers compete for
    one budget (Layer-DefensiveKV). The published code also weights scores by value norms
    (CriticalKV) and sizes budgets per head (AdaKV); neither is done here."""

    name: ClassVar[str] = "defensive"
    aggregation: ClassVar[str] = "defensive"


@dataclass
class LayerDefensivePolicy(DefensivePolicy):
    """Layer-DefensiveKV (same paper): defensive scores, and one top-k over all layers' scores
    sets each layer's budget (layers that spread attention keep more); then per-layer, per-head
    selection as in DefensiveKV."""

    name: ClassVar[str] = "layer_defensive"
    global_budget: ClassVar[bool] = True

    def layer_budgets(self, scores, keep, window):
        layers = sorted(scores)
        if not layers:
            return {}
        B, H = scores[layers[0]].shape[:2]
        flat = torch.cat([scores[layer].reshape(-1) for layer in layers])
        sizes = [scores[layer].shape[-1] for layer in layers]
        total = min(len(layers) * (keep - window) * B * H, flat.numel())
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[flat.topk(total).indices] = True
        counts = torch.stack([c.sum() for c in chosen.split([n * B * H for n in sizes])]).double() / (B * H)
        return {
            layer: window + k for layer, k in zip(layers, _round_preserving_sum(counts, sizes), strict=True)
        }


def _round_preserving_sum(values: torch.Tensor, caps: list[int]) -> list[int]:
    """Round per-layer mean counts to integers (each <= its cap) keeping the total (largest
    remainders first): the kept rows over all layers equal the global budget."""
    floor = values.floor()
    out = floor.long().tolist()
    short = int(round(float(values.sum() - floor.sum())))
    for i in (values - floor).argsort(descending=True).tolist():
        if short <= 0:
            break
        if out[i] < caps[i]:
            out[i] += 1
            short -= 1
    return out


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (FullCache, StreamingPolicy, SnapKVPolicy, DefensivePolicy, LayerDefensivePolicy)
}


def make_policy(name: str, **options) -> EvictionPolicy:
    """The policy registered as `name` (the CLI / request name)."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name](**options)
