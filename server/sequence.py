"""Per-request state: everything one generation needs lives here, never in globals.

A `Sequence` takes tokens one at a time (even when lookahead accepts several in one step), so
EOS, stop strings and max_tokens cut an accepted chunk exactly where plain decoding would stop.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from trieserve.decoding.sampling import SamplingParams, TokenLogprob, token_logprobs


@dataclass
class GenerationRequest:
    """What the HTTP layer submits to the engine."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    lookahead: bool | None = None  # None = server default
    kv_policy: str | None = None
    kv_budget: float | None = None
    kv_regrow: int | None = None  # re-evict after this many new tokens (0 = at prefill only; None = server default)
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)  # end the sequence like EOS (even with ignore_eos)
    logprobs: int | None = None  # None: none; k: each token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)


@dataclass
class Stats:
    forward_passes: int = 0  # prefill counts as one pass however many chunks it takes
    draft_tokens: int = 0
    accepted_tokens: int = 0
    kv_tokens_kept: int = 0
    kv_tokens_total: int = 0
    kv_evictions: int = 0  # compactions: the prefill's (0 or 1) and each one during decoding
    cached_tokens: int = 0  # prompt tokens whose KV rows came from the prefix cache
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def as_dict(self, completion_tokens: int) -> dict:
        return {
            "forward_passes": self.forward_passes,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "tokens_per_forward": round(completion_tokens / self.forward_passes, 4) if self.forward_passes else 0.0,
            "kv_tokens_kept": self.kv_tokens_kept,
            "kv_tokens_total": self.kv_tokens_total,
            "kv_evictions": self.kv_evictions,
            "cached_prompt_tokens": self.cached_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
        }


@dataclass
class Delta:
    text: str
    token_ids: list[int]  # the tokens since the last Delta (one whose text is held back comes later)
    logprobs: list[TokenLogprob] | None = None  # the tokens' since the last Delta, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (first Delta, when asked)


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    stats: dict


@dataclass
class Failure:
    error: Exception


Event = Delta | Finish | Failure


class TextTracker:
    """Incremental detokenization with stop strings checked on decoded text, across chunks.

    Text that might be the start of a stop string, or an incomplete UTF-8 character, is held
    back until it is known to be safe to send.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token_id: int, check: bool = True) -> bool:
        """Append a token; True when a stop string is now complete (text is cut before it).
        `check` False: stop strings are not looked for yet (before min_tokens)."""
        before = len(self.text.rstrip("\ufffd"))  # settled text: a stop must end after it
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop and check:
            # only a stop string this token completes: one complete before (while `check` was
            # off, before min_tokens) does not end the sequence later
            hits = [i for i in (self.text.find(s, max(0, before - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return True
        return False

    def pending(self, final: bool) -> str:
        """Text that can be sent now (everything, when final)."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            end = max(self.sent, end - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out


class Sequence:
    """One request inside the engine."""

    def __init__(self, request: GenerationRequest, tokenizer, eos_ids: set[int], emit: Callable[[Event], None]) -> None:
        self.request = request
        self.params = request.params
        self.prompt_ids = request.prompt_ids
        self.output_ids: list[int] = []
        self.eos_ids = (set() if request.ignore_eos else set(eos_ids)) | set(request.stop_token_ids)
        if self.params.min_tokens:  # the tokens min_tokens keeps from ending the sequence
            self.params = dataclasses.replace(self.params, end_ids=frozenset(self.eos_ids))
        self.text = TextTracker(tokenizer, request.stop)
        self.emit = emit
        self.stats = Stats()
        self.cancelled = threading.Event()
        self.finish_reason: str | None = None
        self.cache = None  # the runner's KVCache, set at prefill
        self.prefilled = False  # the whole prompt is in the cache and the first token chosen
        self.logical_len = 0  # tokens in the cache's logical positions (0..logical_len-1)
        self.pending_token: int | None = None  # chosen but not yet run through the model
        self.generator = None
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.lookahead = False
        self.max_context = 0  # the model's context length, set by the engine
        # the logical length at which the cache is evicted again (--kv-regrow); a step never
        # accepts past it, so the compaction sees the same tokens with lookahead on or off
        self.evict_at: int | None = None
        self.state: dict = {}  # per-sequence data of the speculation machinery (tries, budgets)
        self.unsent_logprobs: list[TokenLogprob] = []  # held with their text until it is sent
        self.unsent_ids: list[int] = []  # likewise the tokens themselves
        self.failed = False  # the engine sent this sequence a Failure
        self.prompt_logprobs: list[TokenLogprob] | None = None  # filled during prefill, sent once

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, tokens: list[int], logits: torch.Tensor | None = None) -> int:
        """Take generated tokens in order until one finishes the sequence; returns how many were
        used. Sends the new text. `logits` [len(tokens), V]: the rows the tokens were chosen
        from, for requests that ask for logprobs."""
        used = 0
        for tok in tokens:
            used += 1
            self.output_ids.append(tok)
            if tok in self.eos_ids:
                self.finish_reason = "stop"
                break
            if self.text.add(tok, check=len(self.output_ids) >= self.params.min_tokens):
                self.finish_reason = "stop"
                break
            if len(self.output_ids) >= self.request.max_tokens:
                self.finish_reason = "length"
                break
        if self.params.min_tokens and len(self.output_ids) >= self.params.min_tokens:
            # the ban is over: back to unadjusted logits (and greedy's one-transfer verification)
            self.params = dataclasses.replace(self.params, min_tokens=0, end_ids=frozenset())
        want = self.request.logprobs
        if want is not None and logits is not None:
            self.unsent_logprobs += token_logprobs(logits, tokens[:used], want)
        self.unsent_ids += tokens[:used]
        text = self.text.pending(final=self.done)
        if text or self.done or self.prompt_logprobs is not None:  # an echoed prompt's go out at once
            sent, self.unsent_logprobs = self.unsent_logprobs, []
            ids, self.unsent_ids = self.unsent_ids, []
            prompt, self.prompt_logprobs = self.prompt_logprobs, None
            self.emit(Delta(text, ids, sent if want is not None else None, prompt))
        return used

    def finish(self, reason: str | None = None) -> None:
        if reason is not None and self.finish_reason is None:
            self.finish_reason = reason
        text = self.text.pending(final=True)  # a cancelled sequence's held-back text and tokens
        if text or self.unsent_ids:
            sent, self.unsent_logprobs = self.unsent_logprobs, []
            ids, self.unsent_ids = self.unsent_ids, []
            self.emit(Delta(text, ids, sent if self.request.logprobs is not None else None))
        self.emit(
            Finish(
                self.finish_reason or "stop",
                len(self.prompt_ids),
                len(self.output_ids),
                self.stats.as_dict(len(self.output_ids)),
            )
        )
        self.cache = None  # free the KV memory now, not when the HTTP side lets go
        self.state.clear()
