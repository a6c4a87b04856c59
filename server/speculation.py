"""Lookahead in the engine: tries, the adaptive draft budget, and the decode step itself.

Per step: draft a tree from the tries, cut it to the size that maximises expected tokens per
second, run [last token] + tree in one forward, accept the longest agreeing path plus a bonus
token, and keep only those rows in the cache. The budget's estimates of cost and gain are in
server/budget.py. With nothing worth drafting the step is a plain one-row forward, so the
worst case is plain decoding plus the (millisecond) drafting cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from trieserve.decoding.draft import DraftConfig, accepted_curve, draft
from trieserve.decoding.tree import DraftTree
from trieserve.decoding.trie import OutputStore, PromptTrie
from trieserve.decoding.verify import verify_greedy, verify_sampling
from trieserve.server.budget import NodeCalibration, Payoff, StepCost, allocate, marginal_gains

log = logging.getLogger(__name__)

# NodeCalibration's averaging weights: a sequence's own rates follow its text quickly; the
# server-wide rates a new sequence starts from move slowly. Chosen by replaying the decoding
# benchmark's greedy outputs through the drafter and budget (no forwards) on its measured
# cost ladder: 0.1-0.3 per sequence and 0.02-0.1 server-wide gave the same speedups +-3 %.
SEQ_ALPHA = 0.2
PRIOR_ALPHA = 0.05
# When no draft could pay, a lookahead sequence still searches its tries every this many steps
# (a millisecond, no forward rows) so its calibration keeps learning what the tries would give.
OBSERVE_EVERY = 4
# The batch discount (Speculator.realism) never scales estimates below this.
DISCOUNT_FLOOR = 0.25
# In a batched step a draft must promise this much more than the plain step's tokens per second.
# A batch's plain step is already efficient (many rows for little more than one row's cost), so
# drafts there are often near break-even; the estimates are optimistic often enough that a
# break-even bet loses on average (measured: chat at concurrency 8 in docs/benchmarks.md).
BATCH_MARGIN = 0.1
# A batched step whose searches found nothing, or whose trees the allocation all dropped, paid for every sequence's search
# and calibration (about 0.7 ms each on the 2-core EPYC: 6 ms of a 68 ms 8-sequence chat step) for
# nothing. The next steps of that batch size then skip drafting, searching only to calibrate, for
# a wait that starts here and doubles while such steps repeat (up to FUTILE_MAX_WAIT); a step that
# keeps a draft resets it.
FUTILE_WAIT = 2
FUTILE_MAX_WAIT = 32


@dataclass
class LookaheadState:
    prompt_trie: PromptTrie
    calibration: NodeCalibration
    inserted: int = 0  # output tokens already streamed into the shared store
    # trees drafted in full and not yet scored against the tokens that followed them:
    # (output index of the tree's first token, tree, which nodes are scored)
    pending: list[tuple[int, DraftTree, list[bool]]] = field(default_factory=list)
    idle: int = 0  # steps since the tries were last searched
    estimate: float = 0.0  # expected accepted draft tokens of the tree `plan` last kept


class Speculator:
    """Owns the shared output store and the cost model; per-sequence state lives on the sequence."""

    def __init__(
        self,
        store: OutputStore,
        config: DraftConfig,
        decoding_length: int,
        cost: StepCost | None,
        trie_path=None,
        adaptive: bool = True,
        cost_path=None,
    ) -> None:
        self.store = store
        # server-wide rates: where a new sequence's calibration starts
        self.prior = NodeCalibration(alpha=PRIOR_ALPHA)
        self.cost_path = cost_path  # where the measured cost ladder is cached (None: not cached)
        self.config = config
        self.decoding_length = decoding_length
        self.cost = cost
        self.trie_path = trie_path
        self.adaptive = adaptive
        self.payoff = Payoff()
        # accepted and estimated draft tokens of verified trees (exponential averages): how far
        # the rates overrate the nodes the budget picks, since it picks the ones rated highest
        self.realism = [1.0, 1.0]
        # batch size -> (the plan count until which it holds back, the wait that set it)
        self.futile: dict[int, tuple[int, int]] = {}
        self.plans = 0  # plans so far: the clock of the holds

    # -- lifecycle of a sequence ---------------------------------------------------------------
    def admit(self, seq) -> None:
        trie = PromptTrie(seq.prompt_ids, ngram_len=self.config.ngram_len)
        seq.state["lookahead"] = LookaheadState(trie, NodeCalibration(SEQ_ALPHA, fallback=self.prior))

    def release(self, seq) -> None:
        state = seq.state.pop("lookahead", None)
        if state is None:
            return
        self._score_pending(seq, state)
        if len(seq.output_ids) > state.inserted:
            self.store.insert(seq.output_ids, state.inserted)

    def _score_pending(self, seq, state: LookaheadState) -> None:
        """Score earlier full trees against the tokens committed since, into the sequence's and
        the server-wide rates (NodeCalibration)."""
        state.pending = [
            entry
            for entry in state.pending
            if not state.calibration.observe_tree(entry[1], seq.output_ids[entry[0] :], entry[2], also=self.prior)
        ]

    def save(self) -> None:
        if self.trie_path is not None:
            self.store.save(self.trie_path)

    # -- the decode step: plan (draft + size), then accept after the batched forward -----------
    def plan(self, runner, seqs: list, extra_rows: int = 0) -> list[DraftTree]:
        """Draft trees for one batched step, one per sequence (empty for sequences not
        speculating), sized together so the whole step maximises expected tokens per second
        (see `allocate`); `extra_rows` ride in the same forward (prefill chunks). When not even
        trees certain to be accepted could pay for their rows in this step, no sequence drafts
        and the tries are searched only every OBSERVE_EVERY steps per sequence, to calibrate."""
        if self.cost is None:  # lookahead off by default: measured when first asked for
            rows = self.decoding_length + 1
            self.cost = (
                StepCost.cached(runner, rows, self.cost_path) if self.cost_path else StepCost.measure(runner, rows)
            )
        # the payoff check also holds back steps that carry a prefill chunk: their drafts look
        # cheap next to the chunk's rows, but they are sized by the same estimates. It guards
        # batched steps only: alone, a failed draft's step is slower than a plain one by nature,
        # so a few misses would read as a loss and back off for up to max_explore steps, while
        # the node calibration already prices misses (measured on a lone RAG request:
        # docs/benchmarks.md, decoding section)
        batched = len(seqs) > 1
        self.plans += 1
        if self.adaptive and not (
            self._could_pay(seqs, extra_rows)
            and (not batched or (self.payoff.allows(len(seqs)) and self._not_futile(len(seqs))))
        ):
            for seq in seqs:
                if seq.lookahead:
                    state: LookaheadState = seq.state["lookahead"]
                    state.idle += 1
                    if state.idle >= OBSERVE_EVERY:  # search anyway, only to keep calibrating
                        self.draft_for(seq)  # which also streams the new output into the store
            return [DraftTree.empty() for _ in seqs]
        trees = [self.draft_for(seq) if seq.lookahead else DraftTree.empty() for seq in seqs]
        if not self.adaptive:
            return trees
        if not any(len(t) for t in trees):  # every search came back empty
            if batched and not extra_rows:
                self._planned(len(seqs), False)
            return trees
        trees = [
            seq.state["lookahead"].calibration.calibrated(t) if len(t) else t
            for t, seq in zip(trees, seqs, strict=True)
        ]
        curves = [accepted_curve(t) if len(t) else [0.0] for t in trees]
        # in a batch, where a plain step is already efficient and drafts are close calls, the
        # estimates are discounted by how much verified trees have fallen short of them
        # (floored: only verified trees move it, so a discount that stopped every batched draft
        # could recover only through lone requests)
        discount = min(1.0, max(DISCOUNT_FLOOR, self.realism[0] / max(self.realism[1], 1e-9))) if batched else 1.0
        marginals = [[m * discount for m in marginal_gains(c)] for c in curves]
        cost = self.cost.for_batch(len(seqs), len(seqs) + extra_rows)
        keep = allocate(marginals, cost, self.decoding_length, extra_rows, _margin(seqs))
        if batched and (any(keep) or not extra_rows):  # a chunk-laden step drops drafts by its own rule
            self._planned(len(seqs), any(keep))
        for seq, curve, k in zip(seqs, curves, keep, strict=True):
            if seq.lookahead:
                seq.state["lookahead"].estimate = curve[k]
        return [tree.top(k) for tree, k in zip(trees, keep, strict=True)]

    def _not_futile(self, seqs: int) -> bool:
        """False while a batch of this size holds back after a plan that kept no draft (the
        hold counts plans of any size: a batch that changed size meanwhile is another batch)."""
        held = self.futile.get(seqs)
        return held is None or self.plans > held[0]

    def _planned(self, seqs: int, kept: bool) -> None:
        """A batched plan drafted every sequence's tree; `kept`: the allocation kept a node. A
        futile plan holds this batch size back for the next `wait` plans, twice the last wait
        when that one ended within FUTILE_MAX_WAIT plans (up to FUTILE_MAX_WAIT), else FUTILE_WAIT."""
        if kept:
            self.futile.pop(seqs, None)
            return
        held = self.futile.get(seqs)
        recent = held is not None and self.plans - held[0] <= FUTILE_MAX_WAIT
        wait = min(2 * held[1], FUTILE_MAX_WAIT) if recent else FUTILE_WAIT
        self.futile[seqs] = (self.plans + wait, wait)

    def _could_pay(self, seqs: list, extra_rows: int = 0) -> bool:
        """A quick bound on what drafting can gain this step: every sequence's tree as good as
        a tree usually gets under its calibration (two nodes at each depth d, each at the best
        rate any node at depth d has, as a tree with shorter-match branches can have; a wide fan
        of well-rated siblings could do better, so this is a heuristic, not a proof). If even
        that loses to a plain step, the step does not draft."""
        best = []
        for seq in seqs:
            if not seq.lookahead:
                best.append([])
                continue
            rates = seq.state["lookahead"].calibration.best_by_depth(self.config.branch_length)
            best.append(sorted((r for r in rates for _ in range(2)), reverse=True)[: self.decoding_length])
        cost = self.cost.for_batch(len(seqs), len(seqs) + extra_rows)
        return any(allocate(best, cost, self.decoding_length, extra_rows, _margin(seqs)))

    def _stream_output(self, seq) -> None:
        """Insert the sequence's output tokens not yet in the shared store."""
        state: LookaheadState = seq.state["lookahead"]
        if len(seq.output_ids) > state.inserted:
            self.store.insert(seq.output_ids, state.inserted)
            state.inserted = len(seq.output_ids)

    def draft_for(self, seq) -> DraftTree:
        """The full-budget tree for one sequence (streams its new output into the store first,
        and keeps the tree to calibrate on once the tokens after it are known)."""
        state: LookaheadState = seq.state["lookahead"]
        self._stream_output(seq)
        self._score_pending(seq, state)
        state.idle = 0
        remaining = seq.request.max_tokens - len(seq.output_ids)
        budget = min(self.decoding_length, max(remaining - 1, 0), runner_room(seq))
        if budget <= 0:
            return DraftTree.empty()
        m = self.config.max_match
        context = seq.output_ids[-m:]
        if len(context) < m:
            context = seq.prompt_ids[-(m - len(context)) :] + context
        tree = draft(context, budget, self.config, state.prompt_trie, self.store)
        if len(tree) and self.adaptive:  # only the adaptive budget uses the calibration
            state.pending.append((len(seq.output_ids), tree, [False] * len(tree)))
        return tree

    def accept(self, seq, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Verify the step's logits [N+1, V] against the tree, keep the accepted rows in the
        cache, and return (new tokens, the packed rows of the accepted draft nodes)."""
        if seq.params.greedy and not seq.params.has_penalties:
            verdict = verify_greedy(tree, logits)
        else:
            verdict = verify_sampling(tree, logits, seq.params, seq.prompt_ids, seq.output_ids, seq.generator)
        seq.cache.keep_path(len(tree) + 1, [0, *verdict.rows])
        seq.logical_len += 1 + len(verdict.rows)
        if len(tree) and self.adaptive:
            self.settle(seq, len(verdict.rows))
        return verdict.tokens, verdict.rows

    def settle(self, seq, accepted: int, alpha: float = 0.02) -> None:
        """A verified tree accepted `accepted` draft tokens against its estimate from `plan`."""
        estimate = seq.state["lookahead"].estimate
        self.realism[0] += alpha * (accepted - self.realism[0])
        self.realism[1] += alpha * (estimate - self.realism[1])

    def observe(self, rows: int, seconds: float, seqs: int = 1, drafted: bool = False) -> None:
        if self.cost is not None:
            self.cost.observe(rows, seconds, seqs, drafted)

    def outcome(self, seqs: int, drafted: bool, tokens: int, seconds: float) -> None:
        """A finished step: `tokens` emitted by `seqs` sequences in `seconds` (drafting,
        forward and verification), with or without a draft."""
        self.payoff.observe(seqs, drafted, tokens, seconds)


def _margin(seqs: list) -> float:
    """BATCH_MARGIN when more than one sequence shares the step; a lone request drafts whenever
    the estimate says it pays (its plain step is one row: drafts there are rarely close calls)."""
    return BATCH_MARGIN if len(seqs) > 1 else 0.0


def runner_room(seq) -> int:
    """Draft rows that still fit in the model's context, and that cannot carry the sequence past
    its next eviction (`Sequence.evict_at`): the step then ends exactly there, as a plain one
    would."""
    room = seq.max_context - seq.logical_len - 1
    if seq.evict_at is not None:
        room = min(room, seq.evict_at - seq.logical_len - 1)
    return max(room, 0)
