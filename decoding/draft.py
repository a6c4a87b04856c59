"""Draft retrieval: propose a token tree that continues the context, from the n-gram tries.

Lookahead (Zhao et al., 2023, "Lookahead: An Inference Acceleration Framework for Large
Language Model with Lossless Generation Accuracy") matches the last one or two tokens; here
the longest known context suffix (up to `max_match` tokens) is matched, falling back to
shorter ones. Candidates are ranked by count, prompt source first, and the tree is grown
best-first by estimated path probability until the budget is spent.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from trieserve.decoding.tree import DraftTree
from trieserve.decoding.trie import OutputStore, PromptTrie, TrieNode

MODES = ("hierarchical", "parallel", "single")


@dataclass(frozen=True)
class DraftConfig:
    """mode: "hierarchical" (shared prefixes share nodes), "parallel" (independent chains) or
    "single" (one chain). max_match: longest context suffix matched. branch_length: max depth."""

    mode: str = "hierarchical"
    max_match: int = 4
    branch_length: int = 12

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"draft mode must be one of {MODES}, got {self.mode!r}")
        if self.max_match < 1:
            raise ValueError(f"max_match must be >= 1, got {self.max_match}")
        if self.branch_length < 1:
            raise ValueError(f"branch_length must be >= 1, got {self.branch_length}")

    @property
    def ngram_len(self) -> int:
        """The n-gram length tries need so a full-depth branch follows a full-length match."""
        return self.max_match + self.branch_length


# (weight, token, prompt child, output child)
_Candidate = tuple[int, int, TrieNode | None, TrieNode | None]
OUTPUT_PRIOR = 1.0  # pseudo-count of "something else" beside the output store's continuations
SHORTER_MATCH_SHARE = 0.5  # weight of a shorter match's extra first tokens, per step shorter


def _count_of(item: tuple[int, TrieNode]) -> int:
    return item[1].count


def _top(children: dict[int, TrieNode], k: int, skip: dict | None = None) -> list[tuple[int, TrieNode]]:
    """The k heaviest (token, node) pairs, ties in dict order, leaving out tokens in `skip`.
    O(len(children)) however large k is: common tokens have thousands of children."""
    items = children.items() if skip is None else [(t, c) for t, c in children.items() if t not in skip]
    if len(items) <= k:
        return sorted(items, key=_count_of, reverse=True)
    return heapq.nlargest(k, items, key=_count_of)


def _ranked_children(p: TrieNode | None, o: TrieNode | None, k: int) -> tuple[list[_Candidate], int]:
    """The k best merged children of a prompt node and an output node, best first, and the total
    weight of all of them. When both sources have children, weight = prompt * scale + output
    with scale above the output total, so prompt counts decide the order and output counts
    only break ties."""
    pc = p.children if p is not None else None
    oc = o.children if o is not None else None
    if not oc:
        if not pc:
            return [], 0
        return [(c.count, t, c, None) for t, c in _top(pc, k)], sum(c.count for c in pc.values())
    o_total = sum(c.count for c in oc.values())
    if not pc:
        # the output store pools other requests' text: a continuation seen once is evidence,
        # not certainty, so OUTPUT_PRIOR unseen counts stand for "the model goes elsewhere"
        return [(c.count, t, None, c) for t, c in _top(oc, k)], o_total + OUTPUT_PRIOR
    scale = o_total + 1
    items = []
    for t, c in pc.items():
        other = oc.get(t)
        items.append((c.count * scale + (other.count if other else 0), t, c, other))
    items.sort(key=lambda it: it[0], reverse=True)
    del items[k:]
    if len(items) < k:  # then every prompt child is in: fill with output-only ones
        items.extend((c.count, t, None, c) for t, c in _top(oc, k - len(items), skip=pc))
    return items, scale * sum(c.count for c in pc.values()) + o_total


def _matches(
    context: list[int], prompt: PromptTrie | None, output: OutputStore | None
) -> list[tuple[int, TrieNode | None, TrieNode | None]]:
    """(suffix length, prompt node, output node) of every context suffix that has continuations
    in either trie, longest first."""
    out = []
    for k in range(len(context), 0, -1):
        suffix = context[-k:]
        p = prompt.find(suffix) if prompt is not None else None
        o = output.find(suffix) if output is not None else None
        if (p is not None and p.children) or (o is not None and o.children):
            out.append((k, p, o))
    return out


def _best_first(matches: list[tuple[int, TrieNode | None, TrieNode | None]], budget: int, depth_cap: int) -> DraftTree:
    """Grow the tree by highest estimated path probability. Nodes come out in pop order, so a
    parent precedes its children and probabilities never increase along a path.

    The longest match's continuations are the root's children; each shorter match adds the
    first tokens the longer ones lack, at SHORTER_MATCH_SHARE of the weight of the match before
    it (a model leaving a long copy often continues as the text did after a shorter context)."""
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    matched: list[int] = []
    heap: list = []
    seq = itertools.count()  # tie-break: earlier push first, so siblings keep rank order

    def push_children(p: TrieNode | None, o: TrieNode | None, parent: int, prob: float, depth: int, k: int) -> None:
        room = budget - len(tokens)  # never need more children than nodes still to place
        if room <= 0:
            return
        items, total = _ranked_children(p, o, room)
        for w, tok, pc, oc in items:
            # min(): prob * w / total may round above prob; a child must not outrank its parent
            heapq.heappush(heap, (-min(prob, prob * w / total), next(seq), tok, parent, pc, oc, depth, k))

    k, p, o = matches[0]
    push_children(p, o, -1, 1.0, 1, k)
    first = {entry[2] for entry in heap}
    share = 1.0
    for k, p, o in matches[1:]:
        share *= SHORTER_MATCH_SHARE
        if share <= 0 or len(first) >= budget:
            break
        items, total = _ranked_children(p, o, budget)
        for w, tok, pc, oc in items:
            if tok not in first:
                first.add(tok)
                heapq.heappush(heap, (-share * w / total, next(seq), tok, -1, pc, oc, 1, k))
    while heap and len(tokens) < budget:
        neg, _, tok, parent, pc, oc, depth, k = heapq.heappop(heap)
        parents.append(parent)
        tokens.append(tok)
        probs.append(-neg)
        matched.append(k)
        if depth < depth_cap:
            push_children(pc, oc, len(tokens) - 1, -neg, depth + 1, k)
    return DraftTree(tokens=tokens, parents=parents, probs=probs, matched=matched)


def _single(k: int, p: TrieNode | None, o: TrieNode | None, length: int) -> DraftTree:
    """The chain that takes the heaviest child at every step (retrieved on k context tokens)."""
    tokens: list[int] = []
    probs: list[float] = []
    prob = 1.0
    while len(tokens) < length:
        items, total = _ranked_children(p, o, 1)
        if not items:
            break
        w, tok, p, o = items[0]
        prob *= w / total
        tokens.append(tok)
        probs.append(prob)
    return DraftTree(tokens=tokens, parents=list(range(-1, len(tokens) - 1)), probs=probs, matched=[k] * len(tokens))


def _chains(tree: DraftTree, budget: int) -> DraftTree:
    """Independent root-to-leaf chains from a best-first tree: its branches by leaf probability,
    each copied whole (the last one cut to fit) until `budget` nodes."""
    assert tree.probs is not None
    probs = tree.probs
    has_child = set(tree.parents)
    leaves = sorted((i for i in range(len(tree)) if i not in has_child), key=lambda i: (-probs[i], i))
    tokens: list[int] = []
    parents: list[int] = []
    out_probs: list[float] = []
    kept: list[int] = []
    for leaf in leaves:
        path = tree.path(leaf)[: budget - len(tokens)]
        for d, i in enumerate(path):
            parents.append(-1 if d == 0 else len(tokens) - 1)
            tokens.append(tree.tokens[i])
            out_probs.append(probs[i])
            kept.append(i)
        if len(tokens) >= budget:
            break
    matched = None if tree.matched is None else [tree.matched[i] for i in kept]
    return DraftTree(tokens=tokens, parents=parents, probs=out_probs, matched=matched)


def draft(
    context: Sequence[int],
    budget: int,
    config: DraftConfig,
    prompt: PromptTrie | None,
    output: OutputStore | None,
) -> DraftTree:
    """Propose at most `budget` tokens, at most `config.branch_length` deep, continuing
    `context` (the committed tokens, prompt included; the last one is the tree's root).

    The result is in depth-first preorder, most probable child first, so the most probable
    branch occupies packed rows 1..d. `probs` holds each node's estimated path probability.
    The output store's lock is held while drafting (about a millisecond for 64 nodes).
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    tail = context[-config.max_match :] if len(context) else []
    tail = tail.tolist() if hasattr(tail, "tolist") else list(tail)  # type: ignore[union-attr]
    if budget == 0 or not tail or (prompt is None and output is None):
        return DraftTree.empty()
    guard = output.locked() if output is not None else contextlib.nullcontext()
    with guard:
        matches = _matches(tail, prompt, output)
        if not matches:
            return DraftTree.empty()
        if config.mode == "single":
            return _single(*matches[0], min(budget, config.branch_length))
        tree = _best_first(matches, budget, config.branch_length)
    if config.mode == "parallel":
        return _chains(tree, budget)  # chains are contiguous already; reordering would not help
    return tree.preordered()


def _prefix_ids(tree: DraftTree) -> list[int]:
    """An id per node naming its token path: nodes with equal ids are the same draft prefix."""
    ids: dict[tuple[int, int], int] = {}
    out: list[int] = []
    for tok, par in zip(tree.tokens, tree.parents, strict=True):
        out.append(ids.setdefault((out[par] if par >= 0 else -1, tok), len(ids)))
    return out


def accepted_curve(tree: DraftTree) -> list[float]:
    """[N+1] expected accepted draft tokens under the estimate when the tree is cut to its k
    most probable nodes (`tree.top(k)`), for k = 0..N. Lets the engine pick the tree size that
    maximises (1 + curve[k]) / cost(k + 1). Duplicate prefixes (parallel chains) count once.
    The engine passes trees whose probabilities it has calibrated first (NodeCalibration)."""
    if tree.probs is None:
        raise ValueError("tree has no probability estimates (probs is None)")
    probs = tree.probs
    ids = _prefix_ids(tree)
    seen: set[int] = set()
    curve = [0.0]
    for i in tree.ranked():
        curve.append(curve[-1] + (0.0 if ids[i] in seen else probs[i]))
        seen.add(ids[i])
    return curve


def expected_accepted(tree: DraftTree) -> float:
    """Expected number of accepted draft tokens under the estimate: the sum of the node path
    probabilities, each distinct prefix counted once. The bonus token is not included."""
    return accepted_curve(tree)[-1]
