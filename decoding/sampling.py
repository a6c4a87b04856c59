"""Sampling: penalties, warpers and the draw itself, as plain functions.

Every function takes one row of logits (shape [V], any float dtype) and works in fp32.
The same functions serve plain decoding and tree verification, which is what keeps
lookahead sampling exact in distribution: each tree node is sampled from exactly the
distribution plain decoding would use at that prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (the limit of the distribution; as vLLM)
LOGIT_BOUND = 1e30  # penalised logits are clamped here, so extreme penalties never overflow to inf


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. A temperature below `GREEDY_BELOW` (0 included) means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (vLLM's)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's
    min_tokens: int = 0  # before this many output tokens, `end_ids` cannot be chosen (vLLM's)
    end_ids: frozenset[int] = frozenset()  # the tokens that would end the sequence (EOS, stop ids)

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        """Whether anything changes the model's logits before the choice (penalties or a logit
        bias): greedy is then the argmax of the adjusted logits, not of the model's."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
            or (self.min_tokens > 0 and bool(self.end_ids))
        )


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded when asked, so a request with a seed is reproducible."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """Repetition penalty (HF/CTRL style, over prompt + output), OpenAI presence/frequency
    penalties (over output only), OpenAI's logit bias, then min_tokens' ban on ending. logits: [V] fp32; returns a new
    tensor. Results are clamped to +-LOGIT_BOUND: a tiny repetition penalty divides a logit past
    fp32's range, and inf logits would make the distribution NaN."""
    if not params.has_penalties:
        return logits
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        ids, counts = torch.tensor(list(output_ids), dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor([b for _, b in params.logit_bias], dtype=logits.dtype, device=logits.device)
    if len(output_ids) < params.min_tokens and params.end_ids:  # too early to end
        logits[torch.tensor(sorted(params.end_ids), dtype=torch.long, device=logits.device)] = float("-inf")
    return logits.clamp_(-LOGIT_BOUND, LOGIT_BOUND)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p (as HF applies them), then min-p. logits: [V] fp32 → [V] fp32
    with -inf on removed tokens."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= 1.0 - params.top_p
        remove_sorted[-1] = False  # always keep the most likely token
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if params.min_p > 0.0:  # p < min_p * p_max  <=>  logit < logit_max + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(params.min_p), float("-inf"))
    return logits


def next_token_distribution(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """The probabilities the next token is drawn from. logits: [V] → probs [V] fp32.
    For greedy params this is one-hot on the (penalised) argmax."""
    logits = apply_penalties(logits.float(), params, prompt_ids, output_ids)
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs[int(torch.argmax(logits))] = 1.0
        return probs
    return warp(logits, params).softmax(-1)


def choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    generator: torch.Generator | None,
) -> int:
    """Pick the next token from one row of logits [V]: argmax when greedy, else a draw."""
    logits = apply_penalties(logits.float(), params, prompt_ids, output_ids)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = warp(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the `top` most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` under the model's raw next-token distributions.

    logits: [n, V], row i the logits `tokens[i]` was chosen from (before penalties, temperature
    and truncation, as vLLM's default raw logprobs). `top`: how many alternatives per position,
    most likely first. One log-softmax in fp32 and one transfer for all rows.
    """
    lp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    rows = torch.arange(len(tokens), device=lp.device)
    chosen_t = lp[rows, torch.tensor(list(tokens), dtype=torch.long, device=lp.device)]
    if top > 0:
        values, ids = lp.topk(top, dim=-1)
        packed = torch.cat([chosen_t.unsqueeze(1), values, ids.to(values.dtype)], dim=1).tolist()
        chosen = [row[0] for row in packed]
        alts = [tuple(zip(map(int, row[1 + top :]), row[1 : 1 + top], strict=True)) for row in packed]
    else:
        chosen = chosen_t.tolist()
        alts = [()] * len(tokens)
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alts, strict=True)]
