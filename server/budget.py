"""What the draft budget weighs: the cost of a forward by rows, and the gain of each draft node.

The budget (server/speculation.py) needs two estimates. Cost: seconds of a forward with n
rows, measured at start-up for a ladder of sizes and refined online from every step
(`StepCost`). Gain: for each draft node, how often a node like it (the same depth, a similar
path probability from the trie counts, a branch found on as many context tokens) has really
been the model's continuation (`NodeCalibration`). Counts are overconfident in a depth-dependent way (a continuation seen once in the prompt is "certain" at every depth, yet a
paraphrasing model leaves it at the first token far more often than midway through a copy) and
underconfident elsewhere (a common token's many continuations each look unlikely, yet the model
repeats itself). Every tree a step drafts is scored in full against the tokens that follow it,
verified part or not, so the rates are learned without the bias of seeing only the nodes the
budget already trusted. A new sequence starts from the server-wide rates.
"""

from __future__ import annotations

import bisect
import heapq
import json
import logging

from trieserve.decoding.tree import DraftTree
from trieserve.decoding.trie import write_atomically

log = logging.getLogger(__name__)

# Every size up to 10 rows: a batched step's rows start at one per sequence, and on a CPU the
# cost curve has steps there (a BLAS kernel switching at 8 or 9 rows) that interpolating
# between 8 and 16 would smooth away. Coarser above, where the curve is close to linear.
COST_LADDER = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256)


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
        steps are not observed, a chunk's rows would blur what the decode rows cost; there the
        penalty scales only what the draft rows add, not the chunk's own seconds.)"""
        penalty = self.draft_penalty(seqs)
        if penalty == 1.0:
            return self
        if base_rows > seqs:  # prefill rows ride along: the penalty is the draft rows' own, not the chunk's
            return lambda rows: (
                self(rows) if rows <= base_rows else self(base_rows) + penalty * (self(rows) - self(base_rows))
            )
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
BUCKET_TOPS = (*(edge - 1e-9 for edge in PROB_EDGES), 1.0)  # the highest estimate in each bucket
MATCH_BUCKETS = range(len(MATCH_EDGES) + 1)


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
        return self._rate_of(self.cell(prob, depth, matched), prob)

    def _rate_of(self, key: tuple[int, int, int], prob: float) -> float:
        """`rate` for a cell already found (`prob`: the node's estimate, the last fallback)."""
        calibration = self
        while key not in calibration.rates:
            if calibration.fallback is None:
                return calibration.coarse.get(key[:2], prob)
            calibration = calibration.fallback
        return calibration.rates[key]

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
            # each estimate bucket at its top: a cell not learned yet rates a node at its own
            # estimate; computed once per depth bucket, not per depth, from the cells' keys
            # (asked by every sequence of a step, and the rates move every step)
            per_bucket: dict[int, float] = {}
            best = []
            for d in range(1, depths + 1):
                b = bisect.bisect_right(DEPTH_EDGES, d)
                if b not in per_bucket:
                    per_bucket[b] = max(
                        self._rate_of((b, p, m), top) for p, top in enumerate(BUCKET_TOPS) for m in MATCH_BUCKETS
                    )
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
    sequence this is the single-request budget.

    With prefill rows in the step that rate misleads: the chunk's seconds buy prompt progress,
    not tokens, so next to them any draft looks like a bargain (on the 2-core EPYC, steps carrying
    ~300 prompt rows drafted 45 nodes for 164 ms more, where plain decode steps would have given
    twice the tokens in that time). There the draft rows must pay for their own seconds at the
    batch's plain decode rate: n maximises kept marginals - (1 + margin) * B / cost(B) *
    (cost(B + extra_rows + n) - cost(B + extra_rows)), and none are kept unless that is above 0."""
    base = len(marginals)
    limit = sum(len(m) for m in marginals) if limit is None else limit
    heap = [(-m[0], b, 0) for b, m in enumerate(marginals) if m]
    heapq.heapify(heap)
    order: list[int] = []  # which sequence's next node each added row is
    if extra_rows:  # the draft rows' own seconds, priced at the plain decode rate
        decode_rate = (1 + margin) * base / cost(base)
        step = cost(base + extra_rows)

        def score(n: int, total: float) -> float:
            return total - decode_rate * (cost(base + extra_rows + n) - step)

        best_n, best_score = 0, 0.0
    else:

        def score(n: int, total: float) -> float:
            return (base + total) / cost(base + n)

        best_n, best_score = 0, (1 + margin) * base / cost(base)
    total = 0.0
    while heap and len(order) < limit:
        gain, b, i = heapq.heappop(heap)
        total -= gain
        order.append(b)
        if i + 1 < len(marginals[b]):
            heapq.heappush(heap, (-marginals[b][i + 1], b, i + 1))
        value = score(len(order), total)
        if value > best_score:
            best_n, best_score = len(order), value
    keep = [0] * base
    for b in order[:best_n]:
        keep[b] += 1
    return keep


def _ladder(max_rows: int) -> list[int]:
    """The row counts a cost ladder is measured at: COST_LADDER up to max_rows, plus max_rows."""
    sizes = [s for s in COST_LADDER if s <= max_rows] or [1]
    if sizes[-1] < max_rows:
        sizes.append(max_rows)
    return sizes


def marginal_gains(curve: list[float]) -> list[float]:
    """Expected extra accepted tokens of each next node: the increments of an accepted curve."""
    return [curve[i + 1] - curve[i] for i in range(len(curve) - 1)]
