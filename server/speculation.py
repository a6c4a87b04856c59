"""Lookahead in the engine: tries, the adaptive draft budget, and the decode step itself.

Per step: draft a tree from the tries, cut it to the size that maximises expected tokens per
second, run [last token] + tree in one forward, accept the longest agreeing path plus a bonus
token, and keep only those rows in the cache.

The budget needs two estimates. Cost: seconds of a forward with n rows, measured at start-up
for a ladder of sizes and refined online from every step. Gain: for each draft node, how often
a node like it (the same depth, a similar path probability from the trie counts, a branch
found on as many context tokens) has really been the model's continuation (`NodeCalibration`). Counts are overconfident in a
depth-dependent way (a continuation seen once in the prompt is "certain" at every depth, yet a
paraphrasing model leaves it at the first token far more often than midway through a copy) and
underconfident elsewhere (a common token's many continuations each look unlikely, yet the model
repeats itself). Every tree a step drafts is scored in full against the tokens that follow it,
verified part or not, so the rates are learned without the bias of seeing only the nodes the
budget already trusted. A new sequence starts from the server-wide rates. With nothing worth
drafting the step is a plain one-row forward, so the worst case is plain decoding plus the
(millisecond) drafting cost.
"""

from __future__ import annotations

import bisect
import heapq
import json
import logging
from dataclasses import dataclass, field

import torch
from trieserve.decoding.draft import DraftConfig, accepted_curve, draft
from trieserve.decoding.tree import DraftTree
from trieserve.decoding.trie import OutputStore, PromptTrie, write_atomically
from trieserve.decoding.verify import verify_greedy, verify_sampling

log = logging.getLogger(__name__)

# Every size up to 10 rows: a batched step's rows start at one per sequence, and on a CPU the
# cost curve has steps there (a BLAS kernel switching at 8 or 9 rows) that interpolating
# between 8 and 16 would smooth away. Coarser above, where the curve is close to linear.
COST_LADDER = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256)
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


class StepCost:
    """Seconds of one forward as a function of the rows it carries (piecewise linear over a
    ladder of sizes, measured on one sequence). Online updates from one-sequence forwards are an
    exponential average per ladder point.

    A batched forward costs more than the ladder says for its rows (attention runs sequence by
    sequence, and more sequences make a step slower in a way the rows alone do not show). That
    extra is learned apart, per number of sequences, as the ratio of real to ladder seconds for
    plain steps and for drafting ones; `for_batch` prices a batch's draft rows with the ratio of
    the two. Batched steps never move the ladder itself: they did once, and a plain 8-sequence
    step (8 rows, every one slowed by the batch) lifted the 8-row point above the ladder's 10-
    to 24-row points, so adding draft rows to a batch looked free (measured on chat at
    concurrency 8: drafting steps priced at 1.05x a plain step cost 1.7x; docs/benchmarks.md)."""

    def __init__(self, sizes: list[int], seconds: list[float], alpha: float = 0.05) -> None:
        self.sizes = list(sizes)
        self.seconds = list(seconds)
        self.alpha = alpha
        # sequences in a batched forward -> [plain, drafting] averages of real / ladder seconds
        self.batched: dict[int, list[float | None]] = {}

    @classmethod
    def measure(cls, runner, max_rows: int, prefix: int = 128, rounds: int = 5) -> StepCost:
        """Time a forward of each ladder size on a scratch cache. Sizes are interleaved over
        several rounds and the fastest run of each kept, so a burst of load from another process
        distorts one sample, not the shape of the curve (decisions depend only on its shape)."""
        sizes = _ladder(max_rows)
        timed = runner.time_row_forwards(sizes, prefix, rounds)[""]
        best = [timed[n] for n in sizes]
        pairs = zip(sizes, best, strict=True)
        log.info("forward cost by rows: %s", ", ".join(f"{n}:{s * 1e3:.1f}ms" for n, s in pairs))
        return cls(sizes, _monotone(best))

    @classmethod
    def cached(cls, runner, max_rows: int, path) -> StepCost:
        """The ladder from `path` when it was measured for the same sizes, else measured now and
        written there. Online updates keep correcting it either way; deleting the file (or a
        new machine, model, dtype or thread count, which change the file's name) re-measures."""
        sizes = _ladder(max_rows)
        try:
            data = json.loads(path.read_text())
            if data["sizes"] == sizes and len(data["seconds"]) == len(sizes):
                log.info("forward cost ladder loaded from %s", path)
                return cls(sizes, _monotone([float(x) for x in data["seconds"]]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        cost = cls.measure(runner, max_rows)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps({"sizes": cost.sizes, "seconds": cost.seconds}).encode())
        except OSError as exc:
            log.warning("could not cache the forward cost ladder at %s: %s", path, exc)
        return cost

    def __call__(self, rows: int) -> float:
        i = bisect.bisect_left(self.sizes, rows)
        if i < len(self.sizes) and self.sizes[i] == rows:
            return self.seconds[i]
        if i == 0:
            return self.seconds[0]
        if i >= len(self.sizes):
            return self.seconds[-1] * rows / self.sizes[-1]
        lo, hi = self.sizes[i - 1], self.sizes[i]
        w = (rows - lo) / (hi - lo)
        return self.seconds[i - 1] * (1 - w) + self.seconds[i] * w

    def observe(self, rows: int, seconds: float, seqs: int = 1, drafted: bool = False) -> None:
        """A forward of `rows` rows over `seqs` sequences took `seconds` (`drafted`: it carried
        draft rows)."""
        if seqs > 1:
            self._observe_batched(rows, seconds, seqs, drafted)
            return
        i = min(bisect.bisect_left(self.sizes, rows), len(self.sizes) - 1)
        # scale the observation to the ladder point so neighbouring sizes share what they learn;
        # clamp it so one step slowed by outside load moves the estimate only a little
        scaled = seconds * self(self.sizes[i]) / max(self(rows), 1e-9)
        scaled = min(max(scaled, 0.5 * self.seconds[i]), 2.0 * self.seconds[i])
        self.seconds[i] += self.alpha * (scaled - self.seconds[i])
        # keep the ladder non-decreasing: a cost that fell with more rows would make rows look free
        for j in range(i + 1, len(self.seconds)):
            self.seconds[j] = max(self.seconds[j], self.seconds[i])
        for j in range(i):
            self.seconds[j] = min(self.seconds[j], self.seconds[i])

    def _observe_batched(self, rows: int, seconds: float, seqs: int, drafted: bool, alpha: float = 0.1) -> None:
        ratio = seconds / max(self(rows), 1e-9)
        pair = self.batched.setdefault(seqs, [None, None])
        i = 1 if drafted else 0
        # a first drafting step starts from the plain ratio: one noisy step must not set the
        # penalty outright (a high one suppresses the very drafts that would correct it)
        old = pair[i] if pair[i] is not None or not drafted else pair[0]
        if old is None:
            pair[i] = ratio
        else:  # damped and clamped like the ladder's own updates
            pair[i] = old + alpha * (min(max(ratio, 0.5 * old), 2.0 * old) - old)

    def draft_penalty(self, seqs: int) -> float:
        """How much dearer, relative to the ladder, a drafting forward of `seqs` sequences has
        been than a plain one (1.0 until both were seen; one sequence: the ladder is its own)."""
        pair = self.batched.get(seqs)
        if seqs <= 1 or pair is None or pair[0] is None or pair[1] is None:
            return 1.0
        return pair[1] / pair[0]

    def for_batch(self, seqs: int, base_rows: int):
        """Cost by rows for a step of `seqs` decoding sequences whose rows without a draft are
        `base_rows`: the ladder, with draft rows priced at the batch's learned penalty. (A step
        that also carries prefill chunks borrows the decode-only figures for its batch size: such
        steps are not observed, a chunk's rows would blur what the decode rows cost.)"""
        penalty = self.draft_penalty(seqs)
        if penalty == 1.0:
            return self
        return lambda rows: self(rows) * (penalty if rows > base_rows else 1.0)


def _monotone(seconds: list[float]) -> list[float]:
    out = []
    for s in seconds:
        out.append(max(s, out[-1]) if out else s)
    return out


# Buckets of the drafter's path probability (from trie counts) and of depth, for NodeCalibration.
PROB_EDGES = (0.03, 0.07, 0.15, 0.25, 0.4, 0.55, 0.7, 0.85, 0.97)
DEPTH_EDGES = (2, 3, 4, 5, 7, 10)  # depth buckets 1, 2, 3, 4, 5-6, 7-9, 10+
# match buckets: unknown (0), one context token, 2-3, 4+ (DraftTree.matched). At the same
# estimate a branch found on four tokens lands far more often than one found on one: the best
# depth-1 node with an estimate of 0.5 or more was the continuation in 85 % and 89 % of steps
# against 25 % and 34 % (RAG-QA, code editing; `bench/draft_replay.py --by-match`, counts in
# docs/benchmarks.md, decoding section)
MATCH_EDGES = (1, 2, 4)


class NodeCalibration:
    """How often a draft node's path is really the model's continuation, by the drafter's own
    estimate (its path probability, bucketed), depth and the number of context tokens its branch
    was found on (`DraftTree.matched`, bucketed): the rates the budget prices nodes at.

    Learned from every tree a step drafted in full, not only the part it verified: once the
    sequence has committed enough tokens, each node's path either matches them or not, and that
    is the same event as "verification would have accepted it" (greedy and sampling alike). A
    calibration learned only from verified nodes sees only the nodes it already trusted: a
    workload whose trusted nodes fail stops drafting and never learns that its modest nodes
    land (measured on open-ended writing: docs/benchmarks.md, decoding section).

    Rates are exponential averages per cell; a cell not seen yet borrows `fallback` (the
    server-wide calibration for a new sequence). The server-wide calibration, which has no
    fallback, also keeps rates per (depth, estimate) over every match length (`coarse`) for its
    cells not seen yet, and the drafter's estimate where that is new too."""

    def __init__(self, alpha: float = 0.1, fallback: NodeCalibration | None = None) -> None:
        self.alpha = alpha
        self.fallback = fallback
        self.rates: dict[tuple[int, int, int], float] = {}  # (depth, estimate, match) buckets
        self.coarse: dict[tuple[int, int], float] = {}  # (depth, estimate): any match; no fallback only
        self.version = 0  # bumped by every update (best_by_depth's cache key)
        self._best: tuple[tuple, list[float]] | None = None

    @staticmethod
    def cell(prob: float, depth: int, matched: int = 0) -> tuple[int, int, int]:
        return (
            bisect.bisect_right(DEPTH_EDGES, depth),
            bisect.bisect_right(PROB_EDGES, prob),
            bisect.bisect_right(MATCH_EDGES, matched),
        )

    def rate(self, prob: float, depth: int, matched: int = 0) -> float:
        """The learned rate of the node's cell. A cell not seen yet: the fallback's rate (which
        backs off in turn) or, without a fallback, the rate of its (depth, estimate) over every
        match length, else the estimate itself."""
        key = self.cell(prob, depth, matched)
        if key in self.rates:
            return self.rates[key]
        if self.fallback is not None:
            return self.fallback.rate(prob, depth, matched)
        return self.coarse.get(key[:2], prob)

    def observe(self, prob: float, depth: int, hit: bool, matched: int = 0) -> None:
        key = self.cell(prob, depth, matched)
        old = self.rates.get(key)
        if old is None:
            old = self.rate(prob, depth, matched)
        self.rates[key] = old + self.alpha * (float(hit) - old)
        if self.fallback is None:  # only read where there is no fallback (see rate)
            old = self.coarse.get(key[:2], prob)
            self.coarse[key[:2]] = old + self.alpha * (float(hit) - old)
        self.version += 1

    def observe_tree(
        self, tree: DraftTree, truth: list[int], done: list[bool] | None = None, also: NodeCalibration | None = None
    ) -> bool:
        """Score the nodes of `tree` that `truth` (the tokens committed after the tree's root, as
        many as are known) decides: a node hits when its path equals truth's first tokens, and
        misses once truth leaves its path (an ancestor missed: known before truth reaches its
        depth). `done` marks nodes already scored (updated in place), so a tree can be scored
        again as more tokens commit; `also` (the server-wide rates) learns the same outcomes
        from the same walk. Returns True when every node is scored."""
        if tree.probs is None:
            return True
        done = done if done is not None else [False] * len(tree)
        matched = tree.matched if tree.matched is not None else [0] * len(tree)
        state: list[bool | None] = []  # per node: hit, miss, or None (not decided yet)
        for i, (tok, par, d) in enumerate(zip(tree.tokens, tree.parents, tree.depths(), strict=True)):
            up = True if par < 0 else state[par]
            if up is False:
                state.append(False)
            elif up is None or d > len(truth):
                state.append(None)
            else:
                state.append(tok == truth[d - 1])
            if state[i] is not None and not done[i]:
                done[i] = True
                self.observe(tree.probs[i], d, state[i], matched[i])
                if also is not None:
                    also.observe(tree.probs[i], d, state[i], matched[i])
        return all(done)

    def calibrated(self, tree: DraftTree) -> DraftTree:
        """The tree with each node's probability replaced by its calibrated rate (never above
        its parent's, so `top(k)` still keeps whole paths)."""
        if tree.probs is None or not len(tree):
            return tree
        depths = tree.depths()
        matched = tree.matched if tree.matched is not None else [0] * len(tree)
        probs: list[float] = []
        for i, par in enumerate(tree.parents):
            p = self.rate(tree.probs[i], depths[i], matched[i])
            probs.append(min(p, probs[par]) if par >= 0 else p)
        return DraftTree(tree.tokens, tree.parents, probs, tree.matched)

    def best_by_depth(self, depths: int) -> list[float]:
        """The highest rate any node at each depth 1..depths could get: an upper bound for
        `Speculator._could_pay`."""
        key = (depths, self.version, self.fallback.version if self.fallback is not None else 0)
        if self._best is None or self._best[0] != key:  # asked every step: computed on change only
            # each bucket at its top: a cell not learned yet rates a node at its own estimate;
            # computed once per depth bucket, not per depth
            probs = (*(edge - 1e-9 for edge in PROB_EDGES), 1.0)
            matches = (0, *MATCH_EDGES)  # one length in each match bucket
            per_bucket: dict[int, float] = {}
            best = []
            for d in range(1, depths + 1):
                b = bisect.bisect_right(DEPTH_EDGES, d)
                if b not in per_bucket:
                    per_bucket[b] = max(self.rate(p, d, m) for p in probs for m in matches)
                best.append(per_bucket[b])
            self._best = key, best
        return self._best[1]


class Payoff:
    """What drafting really delivers, per batch size: tokens per second of steps that verified a
    draft against steps that did not (exponential averages of tokens and of seconds). The budget
    predicts from estimates; this checks the prediction. Where drafting steps have been slower
    than plain ones at this batch size, a step may draft only after `explore` held-back steps,
    so the check keeps learning (the workload or the load may change) while a loss is capped;
    each exploring step that confirms the loss doubles that wait (up to `max_explore`), so a
    workload where drafting keeps losing pays for exploring less and less, and a win resets it."""

    def __init__(self, alpha: float = 0.1, explore: int = 8, max_explore: int = 128) -> None:
        self.alpha = alpha
        self.explore = explore
        self.max_explore = max_explore
        self.stats: dict[int, list[list[float] | None]] = {}  # batch size -> [plain, draft] [tokens, seconds]
        self.skipped: dict[int, int] = {}
        self.wait: dict[int, int] = {}  # batch size -> held-back steps before the next exploring one

    def observe(self, seqs: int, drafted: bool, tokens: int, seconds: float) -> None:
        pair = self.stats.setdefault(seqs, [None, None])
        i = 1 if drafted else 0
        if pair[i] is None:
            pair[i] = [float(tokens), seconds]
        else:
            pair[i][0] += self.alpha * (tokens - pair[i][0])
            pair[i][1] += self.alpha * (seconds - pair[i][1])
        if drafted:
            rates = self.rates(seqs)
            losing = rates is not None and rates[1] < rates[0]
            wait = self.wait.get(seqs, self.explore)
            self.wait[seqs] = min(2 * wait, self.max_explore) if losing else self.explore

    def rates(self, seqs: int) -> tuple[float, float] | None:
        """(plain, drafting) tokens per second at this batch size, once both were seen."""
        pair = self.stats.get(seqs)
        if pair is None or pair[0] is None or pair[1] is None:
            return None
        return pair[0][0] / max(pair[0][1], 1e-9), pair[1][0] / max(pair[1][1], 1e-9)

    def allows(self, seqs: int) -> bool:
        """False when drafting has lost at this batch size and this is not an exploring step."""
        rates = self.rates(seqs)
        if rates is None or rates[1] >= rates[0]:
            return True
        self.skipped[seqs] = self.skipped.get(seqs, 0) + 1
        if self.skipped[seqs] < self.wait.get(seqs, self.explore):
            return False
        self.skipped[seqs] = 0
        return True


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
        if self.adaptive and not (self._could_pay(seqs, extra_rows) and (not batched or self.payoff.allows(len(seqs)))):
            for seq in seqs:
                if seq.lookahead:
                    state: LookaheadState = seq.state["lookahead"]
                    state.idle += 1
                    if state.idle >= OBSERVE_EVERY:  # search anyway, only to keep calibrating
                        self.draft_for(seq)
                    else:
                        self._stream_output(seq)
            return [DraftTree.empty() for _ in seqs]
        trees = [self.draft_for(seq) if seq.lookahead else DraftTree.empty() for seq in seqs]
        if not self.adaptive or not any(len(t) for t in trees):
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
        marginals = [[m * discount for m in _marginals(c)] for c in curves]
        cost = self.cost.for_batch(len(seqs), len(seqs) + extra_rows)
        keep = allocate(marginals, cost, self.decoding_length, extra_rows, _margin(seqs))
        for seq, curve, k in zip(seqs, curves, keep, strict=True):
            if seq.lookahead:
                seq.state["lookahead"].estimate = curve[k]
        return [tree.top(k) for tree, k in zip(trees, keep, strict=True)]

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

    def accept(self, seq, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        """Verify the step's logits [N+1, V] against the tree, keep the accepted rows in the
        cache, and return (new tokens, accepted draft tokens)."""
        if seq.params.greedy and not seq.params.has_penalties:
            verdict = verify_greedy(tree, logits)
        else:
            verdict = verify_sampling(tree, logits, seq.params, seq.prompt_ids, seq.output_ids, seq.generator)
        seq.cache.keep_path(len(tree) + 1, [0, *verdict.rows])
        seq.logical_len += 1 + len(verdict.rows)
        if len(tree) and self.adaptive:
            self.settle(seq, len(verdict.rows))
        return verdict.tokens, len(verdict.rows)

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


def allocate(
    marginals: list[list[float]], cost, limit: int | None = None, extra_rows: int = 0, margin: float = 0.0
) -> list[int]:
    """Draft nodes to keep per sequence for one batched step. marginals[b][i]: expected extra
    accepted tokens from sequence b's (i+1)-th best node; cost(rows): seconds of a forward over
    that many rows; limit: at most this many draft nodes in the whole step; extra_rows: rows the
    forward carries anyway (prefill chunks), which make draft rows cheaper at the margin;
    margin: drafting must beat the plain step's rate by this fraction, or nothing is drafted.

    A batched step is a flattened row batch (server/batch.py): its linear layers, nearly all
    the compute, run over B + n rows for n draft nodes in all, wherever they are. So each total
    n is best spent on the n best nodes of the whole batch (taken in each sequence's own order,
    so every kept tree is a prefix of its ranking), and n maximises
    (B + kept marginals) / cost(B + extra_rows + n); n = 0 (no draft) wins unless a draft beats
    it by `margin`. A good tree in a busy batch is paid for by its own rows only. With one
    sequence this is the single-request budget."""
    base = len(marginals)
    limit = sum(len(m) for m in marginals) if limit is None else limit
    heap = [(-m[0], b, 0) for b, m in enumerate(marginals) if m]
    heapq.heapify(heap)
    order: list[int] = []  # which sequence's next node each added row is
    plain_rate = base / cost(base + extra_rows)
    best_n, best_rate, total = 0, plain_rate * (1 + margin), 0.0
    while heap and len(order) < limit:
        gain, b, i = heapq.heappop(heap)
        total -= gain
        order.append(b)
        if i + 1 < len(marginals[b]):
            heapq.heappush(heap, (-marginals[b][i + 1], b, i + 1))
        rate = (base + total) / cost(base + extra_rows + len(order))
        if rate > best_rate:
            best_n, best_rate = len(order), rate
    keep = [0] * base
    for b in order[:best_n]:
        keep[b] += 1
    return keep


def _margin(seqs: list) -> float:
    """BATCH_MARGIN when more than one sequence shares the step; a lone request drafts whenever
    the estimate says it pays (its plain step is one row: drafts there are rarely close calls)."""
    return BATCH_MARGIN if len(seqs) > 1 else 0.0


def _ladder(max_rows: int) -> list[int]:
    """The row counts a cost ladder is measured at: COST_LADDER up to max_rows, plus max_rows."""
    sizes = [s for s in COST_LADDER if s <= max_rows] or [1]
    if sizes[-1] < max_rows:
        sizes.append(max_rows)
    return sizes


def _marginals(curve: list[float]) -> list[float]:
    return [curve[i + 1] - curve[i] for i in range(len(curve) - 1)]


def runner_room(seq) -> int:
    """Draft rows that still fit in the model's context."""
    return max(seq.max_context - seq.logical_len - 1, 0)
