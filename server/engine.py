"""The engine: one worker thread owns the model and runs the step loop.

One thread, and only one, runs torch work in a serving process. PyTorch's CPU kernels run on
OpenMP, and each thread that runs a parallel region gets its own pool of OpenMP workers; once
two threads hold pools, there are more OpenMP threads than cores (2 + 2 on 2 cores) and libgomp
throttles its workers' spin-waiting, so every small parallel region waits on a sleeping worker.
Measured on the 2-core Xeon (`python bench/threads.py`, fp32): a one-row SmolLM2 step takes
29 ms when one thread does all the torch work and 46 ms in either thread while a second one that
has run torch work is alive. So `builder.build_engine` loads the model and measures its
costs on the engine's own thread, which then runs the loop, and other threads that need the
model (a benchmark's reference runs) hand work to it with `Engine.call`.

Routes submit a `GenerationRequest` with an `emit` callback and get a `Sequence` back; the worker
admits sequences from a bounded queue, prefills them, then advances every running sequence one
decode step per round (draft, verify, accept, rewind). Events flow back through `emit`.
Errors inside one sequence's step fail that sequence only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from trieserve.cache.eviction import Eviction, eviction_for
from trieserve.cache.prefix import PrefixCache
from trieserve.decoding.sampling import choose_token, make_generator, token_logprobs
from trieserve.decoding.tree import DraftTree, pack
from trieserve.server.batch import StepRows
from trieserve.server.errors import QueueFullError, ServerShuttingDownError
from trieserve.server.runner import ModelRunner
from trieserve.server.sequence import Event, Failure, GenerationRequest, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 64
    max_num_seqs: int = 8
    lookahead: bool = True
    kv_policy: str = "full"  # eviction policy after prefill (requests may override)
    kv_budget: float = 1.0  # kept KV entries: fraction of the prompt (<= 1) or token count (> 1)
    kv_window: int = 32  # observation window: the last prompt tokens that score the rest
    kv_regrow: int = 0  # evict again each time the cache has grown by this many tokens (0 = at prefill only)
    prefix_cache_bytes: int = 0  # prompt KV rows shared across requests (cache/prefix.py); 0 = off


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig, metrics=None, speculator=None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        if 0 < config.kv_regrow < config.kv_window:
            raise ValueError(f"kv_regrow ({config.kv_regrow}) must be 0 or at least kv_window ({config.kv_window})")
        self.config = config
        self.metrics = metrics
        self.speculator = speculator
        self.eos_ids = _eos_ids(runner.model, tokenizer)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
        # bounded by `submit_many`'s room check, which counts only sequences not cancelled
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self.running: list[Sequence] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._calls: queue.Queue = queue.Queue()  # (fn, done event, result box) run between rounds
        self._calls_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._calls_closed = False  # set once the loop has ended: later calls run in the caller
        self.built_on: threading.Thread | None = None  # the thread that loaded the model (builder)
        self.fault_hook: Callable[[Sequence], None] | None = None  # tests inject per-sequence faults

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a new thread (see `builder.build_engine` for running it on the thread
        that built the model, which serving should)."""
        self._thread = threading.Thread(target=self.run, name="trieserve-engine", daemon=True)
        self._thread.start()

    def bind_to_current_thread(self) -> None:
        """Make the calling thread the engine's: `call` hands work to it, `run` must follow."""
        self._thread = threading.current_thread()

    def run(self) -> None:
        """The step loop, in the calling thread, until `stop`."""
        self.bind_to_current_thread()
        self._loop()

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn()` on the engine's thread between rounds and return its result (or raise its
        exception): torch work from another thread without a second OpenMP pool (see above)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done, box = threading.Event(), {}
        with self._calls_lock:
            closed = self._calls_closed
            if not closed:
                self._calls.put((fn, done, box))
        if closed:  # the loop has ended: nothing else runs torch on its thread any more
            return fn()
        self._wake.set()
        while not done.wait(0.5):
            if not self._thread.is_alive():
                raise RuntimeError("the engine thread ended before running the call")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done, box = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed back to the caller, not the engine's problem
                box["error"] = exc
            done.set()

    def drain(self, grace_s: float = 0.0) -> None:
        """Stop taking requests; let running and queued ones finish for up to `grace_s`, then end
        the loop, which finishes the rest as "cancelled" (their clients hear it: a final chunk, a
        response). The server calls it as the shutdown signal arrives, while connections are
        still open; `stop` calls it too."""
        with self._submit_lock:  # no submit is half done past this point
            self._accepting = False
        deadline = time.monotonic() + grace_s
        while grace_s > 0 and not self._stopping.is_set() and self._busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()
        self._wake.set()

    def stop(self, grace_s: float = 0.0) -> None:
        """`drain`, then wait for the loop to end and save the trie store."""
        self.drain(grace_s)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.speculator is not None:
            try:
                self.speculator.save()
            except OSError as exc:
                log.error("could not save the trie store: %s", exc)

    def _busy(self) -> bool:
        """Whether a sequence is running or waiting (under the lock `_admit` moves them with)."""
        with self._submit_lock:
            return bool(self.running) or not self.waiting.empty()

    @property
    def queue_length(self) -> int:
        """Sequences waiting for a place in the batch (a cancelled one no longer counts)."""
        with self.waiting.mutex:
            return sum(not seq.cancelled.is_set() for seq in self.waiting.queue)

    # ---- submission (any thread) -------------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Sequence:
        return self.submit_many([request], [emit])[0]

    def submit_many(self, requests: list[GenerationRequest], emits: list[Callable[[Event], None]]) -> list[Sequence]:
        """Queue all of `requests` (an `n` > 1 request's choices) or none: QueueFullError when
        the queue lacks room for all of them."""
        seqs = []
        for request, emit in zip(requests, emits, strict=True):
            if request.kv_regrow is not None and 0 < request.kv_regrow < self.config.kv_window:
                raise ValueError(f"kv_regrow must be 0 or at least the observation window ({self.config.kv_window})")
            seq = Sequence(request, self.tokenizer, self.eos_ids, emit)
            seq.lookahead = self.config.lookahead if request.lookahead is None else request.lookahead
            seq.lookahead = seq.lookahead and self.speculator is not None
            seq.max_context = self.runner.max_context
            seqs.append(seq)
        with self._submit_lock:  # the room check and the puts as one step, after drain's or before
            if not self._accepting:
                raise ServerShuttingDownError("the server is shutting down")
            if self.queue_length + len(seqs) > self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting)")
            for seq in seqs:
                self.waiting.put_nowait(seq)  # only the engine thread takes: the room stays
        self._wake.set()
        return seqs

    # ---- worker ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            with self._calls_lock:
                self._calls_closed = True
            self._run_calls()  # calls queued before the close still run here

    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            self._run_calls()
            self._drop_cancelled_waiting()
            self._admit()
            if not self.running:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._round()
            except Exception as exc:  # a bug outside any one sequence's step: fail the round's
                # sequences loudly rather than let the worker die and every client hang
                log.exception("engine round failed")
                self._fail(list(self.running), exc)
        for seq in self.running + _drain(self.waiting):
            self._release(seq)  # its output still reaches the shared store saved at stop
            seq.finish("cancelled")
        self.running.clear()

    def _drop_cancelled_waiting(self) -> None:
        """End the waiting sequences whose clients have gone (a disconnect, a timeout) now, not
        when a place in the batch frees up."""
        gone, kept = [], []
        with self.waiting.mutex:  # one pass: a client cancelling meanwhile lands in one list
            for seq in self.waiting.queue:
                (gone if seq.cancelled.is_set() else kept).append(seq)
            if gone:
                self.waiting.queue.clear()
                self.waiting.queue.extend(kept)
        for seq in gone:
            self._guarded([seq], lambda ss: self._end(ss[0], "cancelled"))

    def _admit(self) -> None:
        while len(self.running) < self.config.max_num_seqs:
            with self._submit_lock:  # from waiting to running in one step, as `_busy` sees it
                try:
                    seq = self.waiting.get_nowait()
                except queue.Empty:
                    return
                self.running.append(seq)

    def _round(self) -> None:
        """One forward for every sequence past prefill (a decode step) together with the next
        prefill chunk(s), led by the oldest sequence still prefilling (FIFO, so a long prompt is
        never starved). The rows are one flattened batch (server/batch.py), so decode rows ride
        along with a chunk for nearly nothing and running streams never pause for a prefill.
        An evicting prefill scores its own chunks and takes a forward of its own."""
        ready = []
        for seq in list(self.running):
            if seq.cancelled.is_set():
                self._end(seq, "cancelled")
            elif self.fault_hook is None or self._guarded([seq], lambda ss: self.fault_hook(ss[0])):
                ready.append(seq)
        decoding = [s for s in ready if s.prefilled and not s.done]
        prefilling = [s for s in ready if not s.prefilled and not s.done]
        started: list[Sequence] = []
        for seq in prefilling:
            if seq.cache is not None or (
                not self._sibling_prefilling(seq, started) and self._guarded([seq], self._start_prefill)
            ):
                started.append(seq)
        prefilling = started
        group = self._prefill_group(prefilling)
        if decoding or group:
            self._guarded(decoding + group, lambda _: self._step(decoding, group))
        for seq in decoding:
            if seq.evict_at is not None and seq.logical_len >= seq.evict_at and not seq.done and seq in self.running:
                self._guarded([seq], self._evict_again)
        if prefilling and "prefill" in prefilling[0].state:  # an evicting prefill: its own chunked generator
            self._guarded([prefilling[0]], lambda seqs: self._prefill_evicting(seqs[0]))
        for seq in ready:
            if seq.done and seq in self.running:
                self._end(seq)

    def _guarded(self, seqs: list[Sequence], fn) -> bool:
        """Run fn(seqs); an exception fails exactly these sequences, not the engine."""
        try:
            fn(seqs)
            return True
        except Exception as exc:
            log.exception("step failed for %d sequence(s)", len(seqs))
            self._fail(seqs, exc)
            return False

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        for seq in seqs:
            if seq.failed:  # already failed in this step (its own work, then the step's)
                continue
            seq.failed = True
            seq.finish_reason = seq.finish_reason or "error"
            seq.cache = None
            if self.metrics is not None:  # its work counts, as a cancelled sequence's does
                try:
                    self.metrics.finished(seq, len(seq.prompt_ids) if seq.prefilled else 0, len(seq.output_ids), False)
                except Exception:  # failing the sequence must not fail too
                    log.exception("could not count a failed sequence's work")
            self._release(seq)
            seq.emit(Failure(exc))

    def _end(self, seq: Sequence, reason: str | None = None) -> None:
        # metrics first: a client that reads /metrics right after its last event sees itself.
        # A cancelled sequence's work counts too (its prompt if prefilled, its tokens), but not
        # in the latency histograms, which describe completed requests
        if self.metrics is not None:
            prompt = len(seq.prompt_ids) if seq.prefilled else 0
            self.metrics.finished(seq, prompt, len(seq.output_ids), completed=reason is None)
        self._release(seq)  # freed before the client hears it is done
        seq.finish(reason)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def _sibling_prefilling(self, seq: Sequence, started: list[Sequence]) -> bool:
        """Whether `seq` should wait for a running full-cache prefill of the same prompt (an
        `n` > 1 request's choices, or the same prompt sent twice at once): that prefill feeds the
        prefix cache, so `seq` then loads all but the prompt's last block instead of computing it
        again."""
        if self.prefix_cache is None or seq.request.prompt_logprobs is not None:
            return False
        if len(seq.prompt_ids) <= self.prefix_cache.block:
            return False
        return any(
            "prefill" not in other.state  # not an evicting prefill: it will store its blocks
            and len(other.prompt_ids) == len(seq.prompt_ids)
            and (other.prompt_ids is seq.prompt_ids or other.prompt_ids == seq.prompt_ids)
            for other in started
            if not other.prefilled
        )

    def _prefill_group(self, prefilling: list[Sequence]) -> list[Sequence]:
        """Who prefills a chunk in this round's forward: the oldest sequence still prefilling,
        and the next ones while their rows together stay within one chunk of tokens (so a burst
        of short prompts is prefilled together instead of one per round). None when the oldest
        is an evicting prefill (it runs on its own) or nobody is prefilling."""
        if not prefilling or "prefill" in prefilling[0].state:
            return []
        group, tokens = [], 0
        for seq in prefilling:
            if "prefill" in seq.state:
                continue
            width = min(len(seq.prompt_ids) - seq.state["prefill_at"], self.runner.prefill_chunk)
            if group and tokens + width > self.runner.prefill_chunk:
                break
            group.append(seq)
            tokens += width
        return group

    def _start_prefill(self, seqs: list[Sequence]) -> None:
        (seq,) = seqs
        seq.generator = make_generator(seq.params.seed)
        seq.cache = self.runner.new_cache()
        eviction = self._eviction(seq)
        if eviction is not None and eviction.applies(len(seq.prompt_ids), 0):
            if seq.request.prompt_logprobs is not None:  # the API refuses these; a direct caller may not
                raise ValueError("the prompt's logprobs need a full-cache prefill (kv_policy 'full')")
            seq.state["prefill"] = self.runner.prefill_chunks(seq.cache, seq.prompt_ids, eviction=eviction)
        else:
            seq.state["prefill_at"] = 0
            if self.prefix_cache is not None and seq.request.prompt_logprobs is None:  # those need every row
                seq.state["prefill_at"] = seq.stats.cached_tokens = self._prefix_load(seq)

    def _prefill_rows(self, seq: Sequence) -> StepRows:
        """The sequence's next prefill chunk (no eviction); only its last row's logits are kept,
        unless the request asks for the prompt's logprobs."""
        lo = seq.state["prefill_at"]
        hi = min(len(seq.prompt_ids), lo + self.runner.prefill_chunk)
        seq.state["prefill_at"] = hi
        ids = torch.tensor(seq.prompt_ids[lo:hi], dtype=torch.long)
        if seq.request.prompt_logprobs is not None:
            seq.state["prefill_from"] = lo
            return StepRows(ids, torch.arange(lo, hi), None, logits_rows=slice(0, hi - lo))
        return StepRows(ids, torch.arange(lo, hi), None, logits_rows=slice(hi - lo - 1, hi - lo))

    def _prefilled_chunk(self, seq: Sequence, logits: torch.Tensor, elapsed: float) -> None:
        seq.stats.prefill_s += elapsed
        if seq.request.prompt_logprobs is not None:  # row j predicts prompt token lo + j + 1
            lo = seq.state.pop("prefill_from")
            targets = seq.prompt_ids[lo + 1 : seq.state["prefill_at"] + 1]
            found = token_logprobs(logits, targets, seq.request.prompt_logprobs) if targets else []
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = []
            seq.prompt_logprobs.extend(found)
        if seq.state["prefill_at"] == len(seq.prompt_ids):
            del seq.state["prefill_at"]
            if self.prefix_cache is not None:  # the cache holds exactly the prompt's rows now
                self._prefix_store(seq)
            self._first_token(seq, logits[-1], time.perf_counter())

    # the prefix cache is an optimisation: its failure (out of memory copying blocks) costs the
    # request its hit, never the request, nor the others in its step
    def _prefix_load(self, seq: Sequence) -> int:
        try:
            return self.prefix_cache.load(seq.cache, seq.prompt_ids)
        except Exception:
            log.warning("prefix cache lookup failed; prefilling the whole prompt", exc_info=True)
            seq.cache = self.runner.new_cache()
            return 0

    def _prefix_store(self, seq: Sequence) -> None:
        try:
            self.prefix_cache.store(seq.cache, seq.prompt_ids)
        except Exception:
            log.warning("prefix cache store failed; the prompt is not kept", exc_info=True)

    def _prefill_evicting(self, seq: Sequence) -> None:
        """One chunk of an evicting prefill; after the last, its first token."""
        start = time.perf_counter()
        try:
            next(seq.state["prefill"])
            seq.stats.prefill_s += time.perf_counter() - start
            return
        except StopIteration as done:
            logits = done.value
        del seq.state["prefill"]
        seq.stats.kv_evictions += 1
        self._first_token(seq, logits, start)

    def _first_token(self, seq: Sequence, logits: torch.Tensor, start: float) -> None:
        seq.prefilled = True
        seq.logical_len = len(seq.prompt_ids)
        seq.stats.forward_passes += 1
        seq.stats.kv_tokens_total = seq.logical_len
        seq.stats.kv_tokens_kept = round(seq.cache.mean_length())  # per layer and KV head
        self._schedule_eviction(seq)
        if seq.request.max_tokens == 0:  # an echo that scores the prompt: nothing to generate
            seq.finish_reason = "length"
            seq.stats.prefill_s += time.perf_counter() - start
            seq.append([])
            return
        if seq.lookahead:
            self.speculator.admit(seq)
        token = choose_token(logits, seq.params, seq.prompt_ids, seq.output_ids, seq.generator)
        seq.stats.prefill_s += time.perf_counter() - start
        seq.append([token], logits.reshape(1, -1))
        seq.pending_token = token
        seq.first_token_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.first_token(seq)

    def _schedule_eviction(self, seq: Sequence) -> None:
        """With `kv_regrow` N > 0 and an evicting policy, the cache is evicted again each time the
        sequence has N more tokens: to the budget taken over all it has seen (a fraction of
        prompt + output, or a token count), so a long generation's memory stays bounded too."""
        every = self.config.kv_regrow if seq.request.kv_regrow is None else seq.request.kv_regrow
        eviction = self._eviction(seq) if every > 0 else None
        if eviction is None:
            return
        seq.state["evict_again"] = (eviction, every)
        seq.evict_at = seq.logical_len + every

    def _evict_again(self, seqs: list[Sequence]) -> None:
        """Compact a decoding sequence's cache at its `evict_at` (the last window tokens it has
        cached observe, see ModelRunner.evict_again) and schedule the next time."""
        (seq,) = seqs
        eviction, every = seq.state["evict_again"]
        start = time.perf_counter()
        length = seq.logical_len
        w, cached_out = eviction.window, length - len(seq.prompt_ids)  # output tokens in the cache
        head = seq.prompt_ids[len(seq.prompt_ids) - (w - cached_out) :] if cached_out < w else []
        tail = head + seq.output_ids[max(cached_out - w, 0) : cached_out]  # the last w cached tokens
        compacted, forward = self.runner.evict_again(seq.cache, tail, length, eviction)
        if compacted:
            seq.stats.kv_evictions += 1
        if forward:  # the window's forward: a real pass, in the stats and /metrics alike
            seq.stats.forward_passes += 1
            if self.metrics is not None:
                self.metrics.forward_passes.inc()
        seq.stats.kv_tokens_total = length
        seq.stats.kv_tokens_kept = round(seq.cache.mean_length())
        seq.evict_at = length + every
        seq.stats.decode_s += time.perf_counter() - start

    def _eviction(self, seq: Sequence) -> Eviction | None:
        request = seq.request
        policy = request.kv_policy or self.config.kv_policy
        budget = self.config.kv_budget if request.kv_budget is None else request.kv_budget
        return eviction_for(policy, budget, self.config.kv_window)

    def _step(self, seqs: list[Sequence], prefilling: list[Sequence] = ()) -> None:
        """One forward: a decode step for `seqs` (draft, sized for the whole step, then verify
        and accept per sequence) and the next prefill chunk of each of `prefilling`."""
        start = time.perf_counter()
        prefill_parts = [self._prefill_rows(seq) for seq in prefilling]
        extra_rows = sum(p.input_ids.numel() for p in prefill_parts)
        speculating = self.speculator is not None and any(s.lookahead for s in seqs)
        trees = self.speculator.plan(self.runner, seqs, extra_rows) if speculating else [DraftTree.empty()] * len(seqs)
        parts = []
        for seq, tree in zip(seqs, trees, strict=True):
            packed = pack(tree, seq.pending_token, seq.logical_len)
            parts.append(StepRows(packed.input_ids, packed.position_ids, packed.tree_mask if len(tree) else None))
        forward_start = time.perf_counter()
        logits = self.runner.step_batch([s.cache for s in [*seqs, *prefilling]], parts + prefill_parts)
        elapsed = time.perf_counter() - forward_start
        if speculating and not prefilling:  # a chunk's rows would blur what the decode rows cost
            # the flattened batch computes one row per sequence and draft node
            self.speculator.observe(sum(len(t) + 1 for t in trees), elapsed, len(seqs), any(len(t) for t in trees))
        # past the shared forward, each sequence's own work (first token, verify, sample, detokenise,
        # logprobs) that raises fails that sequence only
        for seq, rows in zip(prefilling, logits[len(seqs) :], strict=True):
            self._guarded([seq], lambda ss, rows=rows: self._prefilled_chunk(ss[0], rows, elapsed))
        emitted = 0
        for seq, tree, rows in zip(seqs, trees, logits[: len(seqs)], strict=True):
            try:
                emitted += self._advance(seq, tree, rows, start)
            except Exception as exc:
                log.exception("step failed for one sequence")
                self._fail([seq], exc)
        if speculating and not prefilling:  # a step carrying a chunk says nothing about drafting's payoff
            self.speculator.outcome(len(seqs), any(len(t) for t in trees), emitted, time.perf_counter() - start)

    def _advance(self, seq: Sequence, tree: DraftTree, rows: torch.Tensor, start: float) -> int:
        """Verify the sequence's tree (or choose its one token) from its logits `rows`, append
        what it keeps; returns the number of tokens taken."""
        if seq.lookahead and len(tree):
            tokens, kept = self.speculator.accept(seq, tree, rows)
        else:  # a plain step (no draft this time): the token as plain decoding chooses it
            seq.logical_len += 1
            tokens = [choose_token(rows[0], seq.params, seq.prompt_ids, seq.output_ids, seq.generator)]
            kept = []
        accepted = len(kept)
        seq.stats.forward_passes += 1
        seq.stats.draft_tokens += len(tree)
        seq.stats.accepted_tokens += accepted
        # token i was chosen from the row of its parent: the root, then each accepted node
        used = seq.append(tokens, rows[[0, *kept]] if seq.request.logprobs is not None else None)
        seq.pending_token = tokens[-1]
        seq.stats.decode_s += time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.step(len(tree), accepted, used)
        return len(tokens)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _drain(q: queue.Queue) -> list[Sequence]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
