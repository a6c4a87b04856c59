"""Prometheus metrics, in a registry of their own per server instance."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "trieserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("trieserve_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("trieserve_generation_tokens", "tokens generated", registry=r)
        self.forward_passes = Counter(
            "trieserve_forward_passes", "model forward passes (prefill counts one)", registry=r
        )
        self.draft_tokens = Counter("trieserve_draft_tokens", "draft tokens proposed by lookahead", registry=r)
        self.accepted_tokens = Counter("trieserve_accepted_tokens", "draft tokens accepted", registry=r)
        self.drafts = Counter("trieserve_drafts", "decode steps that carried a draft tree", registry=r)
        self.kv_kept = Counter("trieserve_kv_tokens_kept", "KV tokens kept after eviction", registry=r)
        self.kv_seen = Counter("trieserve_kv_tokens_seen", "KV tokens before eviction", registry=r)
        self.kv_evicted = Counter("trieserve_kv_tokens_evicted", "KV tokens dropped by eviction", registry=r)
        self.kv_bytes = Gauge("trieserve_kv_cache_bytes", "bytes held by running sequences' KV caches", registry=r)
        self.prefix_hits = Counter(
            "trieserve_prefix_cache_hit_tokens", "prompt tokens whose prefill the prefix cache saved", registry=r
        )
        self.prefix_queries = Counter(
            "trieserve_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_bytes = Gauge("trieserve_prefix_cache_bytes", "bytes held by the prefix cache", registry=r)
        self._prefix_seen = (0, 0)  # the store's hit and queried counts already added
        self.ttft = Histogram(
            "trieserve_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "trieserve_time_per_output_token_seconds",
            "mean time per output token after the first",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
            registry=r,
        )
        self.e2e = Histogram(
            "trieserve_e2e_request_latency_seconds", "request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.accepted_length = Histogram(
            "trieserve_accepted_length",
            "tokens emitted per decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            registry=r,
        )
        self.queue_length = Gauge("trieserve_queue_length", "requests waiting for the engine", registry=r)
        self.running = Gauge("trieserve_running_requests", "sequences being generated", registry=r)

    # called from the engine thread
    def first_token(self, seq) -> None:
        self.ttft.observe(time.monotonic() - seq.created)

    def step(self, drafted: int, accepted: int, emitted: int) -> None:
        self.forward_passes.inc()
        if drafted:
            self.drafts.inc()
            self.draft_tokens.inc(drafted)
            self.accepted_tokens.inc(accepted)
        self.accepted_length.observe(emitted)

    def finished(self, seq, prompt_tokens: int, completion_tokens: int, completed: bool = True) -> None:
        """A sequence has ended: its work into the counters (prompt_tokens 0 when it never
        prefilled); its latency into the histograms only when it completed (not cancelled)."""
        now = time.monotonic()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if prompt_tokens:
            self.forward_passes.inc()  # the prefill
        self.kv_kept.inc(seq.stats.kv_tokens_kept)
        self.kv_seen.inc(seq.stats.kv_tokens_total)
        self.kv_evicted.inc(max(seq.stats.kv_tokens_total - seq.stats.kv_tokens_kept, 0))
        if not completed:
            return
        self.e2e.observe(now - seq.created)
        if completion_tokens > 1 and seq.first_token_at is not None:
            self.tpot.observe((now - seq.first_token_at) / (completion_tokens - 1))

    def render(self, engine=None) -> bytes:
        if engine is not None:
            self.queue_length.set(engine.queue_length)
            running = list(engine.running)
            self.running.set(len(running))
            caches = [seq.cache for seq in running]
            self.kv_bytes.set(sum(c.nbytes() for c in caches if c is not None))
            prefix = getattr(engine, "prefix_cache", None)
            if prefix is not None:  # the store counts on the engine thread; the counters catch up here
                self.prefix_bytes.set(prefix.nbytes)
                hits, queried = prefix.hit_tokens, prefix.queried_tokens
                self.prefix_hits.inc(max(hits - self._prefix_seen[0], 0))
                self.prefix_queries.inc(max(queried - self._prefix_seen[1], 0))
                self._prefix_seen = (hits, queried)
        return generate_latest(self.registry)
