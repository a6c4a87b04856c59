"""The model runner: the only code that calls the model's forward.

Every forward is "new rows attend to the whole cache plus, among themselves, what a mask
allows". Prefill is a chain mask, a plain decode step is one row, a lookahead step is the packed
draft tree with its ancestor mask. Positions are logical (they continue from the number of tokens
the sequence has processed, whatever the cache holds after eviction).

The mask reaches attention through transformers' attention interface: the model is loaded with
`attn_implementation="trieserve"`, a registered function that receives the tree mask as a keyword
argument of the forward call. No model code is patched. The same route carries a `WindowCapture`
during an evicting prefill: each layer records its observation window's queries, which
`trieserve.cache.eviction` scores against that layer's keys (see its docstring).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from trieserve.cache.eviction import (
    DECODE_HEADROOM,
    Eviction,
    PrefillTrace,
    WindowCapture,
    chunk_bounds,
    compress,
)
from trieserve.cache.kv import KVCache
from trieserve.kernels.dispatch import use_triton
from trieserve.kernels.tree_attention import attention_forward as kernel_attention_forward
from trieserve.kernels.tree_attention import pack_ancestor_mask
from trieserve.server import matmul
from trieserve.server.batch import MAX_TREE_ROWS, BatchCache, StepRows, TreeLayout, flatten_rows, row_offsets
from trieserve.server.lean import LeanLlama, supports

ATTENTION_NAME = "trieserve"


def tree_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [B, Hq, T, D]; key/value [B, Hkv, S, D] whose last T rows are the new tokens.
    `tree_mask` (bool [T, T] or [B, T, T]) says which new rows see which; without one the new rows
    are causal. `key_cache` (the KVCache the keys come from) marks padding rows of per-head
    budgets, which no query sees. `window_capture` (a WindowCapture) records this layer's last
    window queries. Returns ([B, T, Hq, D], None) as transformers expects."""
    if isinstance(key, list):  # a batched step: each sequence attends to its own cache
        return _per_sequence_attention(module, query, key, value, scaling, kwargs)
    capture = kwargs.get("window_capture")
    if capture is not None:
        out_proj = getattr(getattr(module, "o_proj", None), "weight", None)
        capture.record(module.layer_idx, query, scaling, out_proj)
    cache = kwargs.get("key_cache")
    valid = cache.layers[module.layer_idx].valid_rows() if cache is not None else None
    if kwargs.get("anc_bits") is not None and valid is None:
        # the kernel path (CUDA, or forced): the Triton tree-attention kernel reads the
        # bit-packed ancestor mask (a layer with padding rows takes the SDPA path below)
        return kernel_attention_forward(module, query, key, value, None, scaling=scaling, **kwargs)
    mask, is_causal = _attention_mask(query, key.shape[2], kwargs.get("tree_mask"), valid)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _attention_mask(
    query: torch.Tensor, s: int, tree_mask: torch.Tensor | None, valid: torch.Tensor | None
) -> tuple[torch.Tensor | None, bool]:
    """(bool mask broadcastable to [B, Hq, T, S] or None, is_causal) for T new rows over S keys:
    every cached row, the tree (or causal) mask among the new rows, minus padding rows (`valid`
    bool [B, Hkv, S])."""
    t = query.shape[2]
    mask = None
    if t > 1:
        if tree_mask is None and s == t and valid is None:
            return None, True
        if tree_mask is None:
            tree_mask = torch.ones(t, t, dtype=torch.bool, device=query.device).tril_()
        full = torch.ones(*tree_mask.shape[:-1], s, dtype=torch.bool, device=query.device)
        full[..., s - t :] = tree_mask
        mask = full.unsqueeze(-3) if full.dim() == 3 else full
    if valid is not None:
        rows = valid.repeat_interleave(query.shape[1] // valid.shape[1], dim=1)[:, :, None, :]  # [B, Hq, 1, S]
        mask = rows if mask is None else mask & rows
    return mask, False


def _per_sequence_attention(module, query, keys, values, scaling, kwargs):
    """query [1, Hq, N, D] (flattened rows, see server/batch.py); keys/values: per-sequence
    [1, Hkv, S_b, D]. Returns [1, N, Hq, D]."""
    rows, offsets, masks = kwargs["batch_rows"], kwargs["batch_offsets"], kwargs["batch_tree_masks"]
    caches = kwargs["batch_caches"]
    kernel, layout = kwargs.get("step_attention"), kwargs.get("batch_tree_layout")
    if kernel is not None and layout is not None:
        layer = module.layer_idx
        parts = [b for b in layout.parts if caches[b].layers[layer].valid_rows() is None]
        if len(parts) < len(layout.parts):  # per-head budgets' padding rows need a mask: SDPA
            layout = TreeLayout.of(rows, offsets, masks, parts)
    else:
        layout = None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layout is not None:
        q = query[0].transpose(0, 1) if layout.index is None else query[0, :, layout.index].transpose(0, 1)
        got = kernel(q, [keys[b] for b in layout.parts], [values[b] for b in layout.parts], layout.row_part,
                     layout.visible, scale)  # fmt: skip
        if layout.index is None:  # every part: the rows are in order
            return got.unsqueeze(0), None
    if len(rows) == 1 and layout is None:
        extra = _mask_kwargs(masks[0], query, caches[0])
        return tree_sdpa_attention(module, query, keys[0], values[0], None, scaling=scaling, **extra)
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    done = set()
    if layout is not None:
        out[0, layout.index] = got
        done = set(layout.parts)
    for b, (lo, t, key, value, mask, cache) in enumerate(zip(offsets, rows, keys, values, masks, caches, strict=True)):
        if b in done:
            continue
        extra = _mask_kwargs(mask, query, cache)
        o, _ = tree_sdpa_attention(module, query[:, :, lo : lo + t], key, value, None, scaling=scaling, **extra)
        out[:, lo : lo + t] = o
    return out, None


def _mask_kwargs(mask: torch.Tensor | None, query: torch.Tensor, cache: KVCache) -> dict:
    if mask is None:
        return {"key_cache": cache}
    if use_triton(query):
        return {"tree_mask": mask, "anc_bits": pack_ancestor_mask(mask.unsqueeze(0)), "key_cache": cache}
    return {"tree_mask": mask, "key_cache": cache}


AttentionInterface.register(ATTENTION_NAME, tree_sdpa_attention)


class ModelRunner:
    """Wraps a HF causal LM: prefill and (tree) steps into a per-sequence KVCache."""

    def __init__(self, model, prefill_chunk: int = 512, skinny_rows: int = matmul.MAX_ROWS, lean: bool = True) -> None:
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        # the lean forward (server/lean.py) where the architecture allows it; same results
        self.lean = LeanLlama.of(model, tree_sdpa_attention) if lean and supports(model) else None
        self.config = model.config
        self.device = next(model.parameters()).device
        self.prefill_chunk = prefill_chunk
        self.num_layers = model.config.num_hidden_layers
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.skinny_rows = 0
        self.matmul_kernel = "skinny"
        self.skinny_min_rows = 2  # 1: one-row forwards take the kernel too
        # attention of decode rows and lookahead trees in steps (`tree_attention` in
        # server/stream_linear.cpp) and their KV append; None: SDPA and tensor ops (`use_kernels`)
        self.step_attention: Callable | None = None
        self.append_rows: Callable | None = None
        self.set_skinny_rows(skinny_rows)

    def set_skinny_rows(self, max_rows: int, kernel: str = "skinny", min_rows: int = 2) -> None:
        """Route CPU forwards of min_rows..max_rows rows (min_rows 1 or 2) through a few-row
        matmul kernel ("skinny" or "stream"; 0 rows: stock F.linear everywhere); see
        trieserve.server.matmul."""
        if matmul.install(self.model, max_rows, kernel, min_rows):
            self.skinny_rows, self.matmul_kernel, self.skinny_min_rows = max_rows, kernel, min_rows
        else:
            matmul.uninstall(self.model)
            self.skinny_rows, self.matmul_kernel, self.skinny_min_rows = 0, "skinny", 2

    def use_kernels(self, module) -> None:
        """Take decode rows and trees through the C++ kernels of `module` (matmul.load_stream),
        or (None) through SDPA and tensor ops."""
        self.step_attention = None if module is None else module.tree_attention
        self.append_rows = None if module is None else module.append_rows

    def set_route(self, route: matmul.Route) -> None:
        """`set_skinny_rows` from a `matmul.Route`."""
        self.set_skinny_rows(route.max_rows, route.kernel, route.min_rows)

    @property
    def route(self) -> matmul.Route:
        return matmul.Route(self.matmul_kernel, self.skinny_rows, self.skinny_min_rows)

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    def time_row_forwards(
        self, sizes, prefix: int = 128, rounds: int = 3, arms: dict[str, Callable[[], object]] | None = None
    ) -> dict[str, dict[int, float]]:
        """Seconds of one forward of each row count in `sizes` (one sequence, `prefix` tokens
        cached, causal rows: a lookahead step's shape) on a scratch cache. Sizes, and `arms`
        (name -> a setup called before that arm's sizes, e.g. switching the matmul route), are
        interleaved over `rounds` plus a warm-up round, and the fastest run of each is kept, so a
        burst of load from another process distorts one sample, not the shape of the curve.
        Returns {arm: {rows: seconds}} ({"": ...} without arms)."""
        arms = arms or {"": lambda: None}
        cache = self.new_cache()
        self.prefill(cache, [min(100 + i, self.vocab_size - 1) for i in range(prefix)])
        best: dict[str, dict[int, float]] = {name: {} for name in arms}
        for r in range(rounds + 1):  # round 0 warms every shape up and is not counted
            for name, setup in arms.items():
                setup()
                for n in sizes:
                    mask = torch.ones(n, n, dtype=torch.bool).tril_()
                    start = time.perf_counter()
                    self.step(cache, torch.full((n,), 100), torch.arange(prefix, prefix + n), mask)
                    seconds = time.perf_counter() - start
                    cache.truncate_new(n, 0)
                    if r:
                        best[name][n] = min(best[name].get(n, float("inf")), seconds)
        return best

    @torch.no_grad()
    def forward(
        self,
        cache: KVCache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
        window_capture: WindowCapture | None = None,
    ) -> torch.Tensor:
        """input_ids, position_ids: [T] long; tree_mask: bool [T, T] or None (causal);
        window_capture: filled with every layer's last window queries (eviction scoring).
        Returns fp32 logits [T, V] (or [1, V] with last_only)."""
        kwargs = {"key_cache": cache}
        if window_capture is not None:
            kwargs["window_capture"] = window_capture
        if tree_mask is not None:
            kwargs["tree_mask"] = tree_mask.to(self.device)
            if use_triton(kwargs["tree_mask"]):
                kwargs["anc_bits"] = pack_ancestor_mask(kwargs["tree_mask"].unsqueeze(0))
        input_ids, position_ids = input_ids.to(self.device).unsqueeze(0), position_ids.to(self.device).unsqueeze(0)
        if self.lean is None:  # the model's own forward, logit scaling or soft-capping included
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1 if last_only else 0,
                **kwargs,
            )
            return out.logits[0].float()
        hidden = self._hidden(input_ids, position_ids, cache, **kwargs)
        if last_only:
            hidden = hidden[:, -1:]
        return self.model.get_output_embeddings()(hidden)[0].float()

    def _hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
        """Last hidden states [1, T, hidden] of a forward over [1, T] rows into `cache`."""
        if self.lean is not None:
            return self.lean.forward(
                input_ids,
                position_ids,
                cache,
                max_rows=self.skinny_rows,
                kernel=self.matmul_kernel,
                min_rows=self.skinny_min_rows,
                **kwargs,
            )
        return self.model.base_model(
            input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True, **kwargs
        ).last_hidden_state

    def prefill(
        self,
        cache: KVCache,
        token_ids: list[int],
        start: int = 0,
        eviction: Eviction | None = None,
        trace: PrefillTrace | None = None,
    ) -> torch.Tensor:
        """Run tokens[start:] (positions start..) through the model; logits [V] of the last."""
        chunks = self.prefill_chunks(cache, token_ids, start, eviction, trace)
        while True:
            try:
                next(chunks)
            except StopIteration as done:
                return done.value

    def prefill_chunks(
        self,
        cache: KVCache,
        token_ids: list[int],
        start: int = 0,
        eviction: Eviction | None = None,
        trace: PrefillTrace | None = None,
    ) -> Generator[int, None, torch.Tensor]:
        """Prefill one chunk per `next()` (yielding the tokens done so far), so the engine can
        interleave a long prompt with other sequences' decode steps; returns logits [V] of the
        last token (StopIteration.value).

        With `eviction`, layers over budget are compacted after each chunk (every chunk holds at
        least the window), and after the last one every layer keeps the budget; positions stay
        logical. `trace` records peak and final KV bytes."""
        n = len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long)
        if eviction is not None and not eviction.applies(n, start):
            eviction = None
        window = eviction.window if eviction is not None else 1
        bounds = chunk_bounds(start, n, self.prefill_chunk, window)
        logits = None
        for i, (lo, hi) in enumerate(bounds):
            capture = WindowCapture(window) if eviction is not None and eviction.policy.needs_queries else None
            logits = self.forward(cache, ids[lo:hi], torch.arange(lo, hi), last_only=True, window_capture=capture)
            if trace is not None:
                trace.observe(cache)
            if eviction is not None:
                last = i == len(bounds) - 1
                reserve = DECODE_HEADROOM if last else bounds[i + 1][1] - bounds[i + 1][0]
                done = compress(
                    cache, eviction.policy, capture, eviction.keep(n), window,
                    slack=0 if last else eviction.slack, reserve=reserve,
                )  # fmt: skip
                if trace is not None:
                    trace.compactions += len(done)
            if i < len(bounds) - 1:
                yield hi
        assert logits is not None, "prefill needs at least one token"
        if trace is not None:
            trace.final_bytes = cache.nbytes()
        return logits[-1]

    @torch.no_grad()
    def evict_again(
        self, cache: KVCache, tail_ids: list[int], logical_len: int, eviction: Eviction
    ) -> tuple[int, bool]:
        """Compact a decoding sequence's cache to `eviction.keep(logical_len)` rows per layer (the
        budget taken over everything the sequence has seen, prompt and output). The observation
        window is the last W tokens in the cache (`tail_ids`, logical positions
        logical_len - W .. logical_len - 1): their rows are dropped and computed again in one
        W-row forward that captures their queries, as the last chunk of an evicting prefill does;
        the recomputed rows equal the dropped ones up to float summation order. A policy that
        needs no queries (streaming) skips the forward, and so does a cache no layer of which is
        over the budget (nothing to compact). Returns (layers compacted, whether a forward ran)."""
        w = eviction.window
        if len(tail_ids) != w:
            raise ValueError(f"the observation window needs the last {w} tokens, got {len(tail_ids)}")
        if min(cache.lengths()) < w:
            raise ValueError(f"the cache holds fewer rows than the window ({w})")
        keep = eviction.keep(logical_len)
        if max(cache.lengths()) <= keep:  # exactly when `compress` would compact nothing
            return 0, False
        capture = None
        if eviction.policy.needs_queries:
            cache.truncate_new(w, 0)
            capture = WindowCapture(w)
            ids = torch.tensor(tail_ids, dtype=torch.long, device=self.device).unsqueeze(0)
            pos = torch.arange(logical_len - w, logical_len, device=self.device).unsqueeze(0)
            self._hidden(ids, pos, cache, key_cache=cache, window_capture=capture)
        done = compress(cache, eviction.policy, capture, keep, w, reserve=DECODE_HEADROOM)
        return len(done), capture is not None

    @torch.no_grad()
    def step_batch(self, caches: list[KVCache], parts: list[StepRows]) -> list[torch.Tensor]:
        """One forward over several sequences' new rows (see server/batch.py for the layout).
        Returns fp32 logits [T_b, V] per sequence (only `logits_rows` when a part sets it)."""
        ids, pos, rows = flatten_rows(parts, self.device)
        offsets = row_offsets(rows)
        masks = [
            None if p.tree_mask is None or p.input_ids.numel() == 1 else p.tree_mask.to(self.device) for p in parts
        ]
        layout = None
        if self.step_attention is not None:
            # decode rows and trees; prefill chunks (causal, many rows) stay on SDPA's flash kernel
            trees = [b for b, t in enumerate(rows) if t == 1 or (masks[b] is not None and t <= MAX_TREE_ROWS)]
            layout = TreeLayout.of(rows, offsets, masks, trees)
        hidden = self._hidden(
            ids,
            pos,
            BatchCache(caches, rows, offsets, self.append_rows),
            batch_rows=rows,
            batch_offsets=offsets,
            batch_tree_masks=masks,
            batch_caches=caches,
            step_attention=self.step_attention,
            batch_tree_layout=layout,
        )
        picked = []
        for lo, t, p in zip(offsets, rows, parts, strict=True):
            sl = p.logits_rows if p.logits_rows is not None else slice(0, t)
            picked.append(hidden[0, lo + sl.start : lo + sl.stop])
        logits = self.model.get_output_embeddings()(torch.cat(picked)).float()
        return list(logits.split([t.shape[0] for t in picked]))

    def step(
        self, cache: KVCache, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One decode step over packed rows (one row, or [last token] + draft tree). Logits [T, V]."""
        if input_ids.numel() == 1:
            tree_mask = None
        return self.forward(cache, input_ids, position_ids, tree_mask)
