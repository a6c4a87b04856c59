"""Draft trees and their packing into one verification forward pass.

A draft tree holds N candidate tokens that continue the last committed token (the root,
which is not part of the tree). `pack` lays the root and the tree out as N+1 rows of one
forward pass: each row attends to the KV cache and to its own ancestors in the tree, so
every row's logits are the model's next-token logits after that row's own prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """N draft tokens in packed order; a parent always comes before its children.

    tokens:  [N] token ids.
    parents: [N] index into `tokens` of each node's parent, or -1 when the parent is the root
             (the last committed token).
    probs:   [N] estimated probability that each node's whole path is accepted, or None.
             Non-increasing from parent to child when set by the drafter.
    matched: [N] how many context tokens the branch was retrieved on (the length of the
             context suffix the node's depth-1 ancestor continues in the trie), or None. A
             branch found after four matching tokens lands far more often than one found after
             one, at the same estimated probability (the budget's calibration keys on it).
    """

    tokens: list[int]
    parents: list[int]
    probs: list[float] | None = None
    matched: list[int] | None = None

    @staticmethod
    def empty() -> DraftTree:
        return DraftTree(tokens=[], parents=[], probs=[])

    def __len__(self) -> int:
        return len(self.tokens)

    def validate(self) -> None:
        """Raise ValueError on a malformed tree (lengths, parent order, token ids, probs)."""
        n = len(self.tokens)
        if len(self.parents) != n:
            raise ValueError(f"tree has {n} tokens but {len(self.parents)} parents")
        if self.probs is not None and len(self.probs) != n:
            raise ValueError(f"tree has {n} tokens but {len(self.probs)} probs")
        if self.matched is not None and len(self.matched) != n:
            raise ValueError(f"tree has {n} tokens but {len(self.matched)} match lengths")
        for i, (tok, par) in enumerate(zip(self.tokens, self.parents, strict=True)):
            if not isinstance(tok, int) or tok < 0:
                raise ValueError(f"tree token {i} is {tok!r}, expected a non-negative int")
            if not isinstance(par, int) or not -1 <= par < i:
                raise ValueError(f"tree node {i} has parent {par!r}, expected -1 <= parent < {i}")

    def depths(self) -> list[int]:
        """[N] depth of each node, 1-based: a child of the root has depth 1."""
        out: list[int] = []
        for par in self.parents:
            out.append(1 if par < 0 else out[par] + 1)
        return out

    def max_depth(self) -> int:
        return max(self.depths(), default=0)

    def child_lists(self) -> list[list[int]]:
        """Children by packed row: entry 0 lists the root's children, entry i+1 those of node i.
        Values are node indices, in packed order. Built in O(N)."""
        out: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, par in enumerate(self.parents):
            out[par + 1].append(i)
        return out

    def children(self, i: int) -> list[int]:
        """Node indices of the children of node i (i == -1: the root's children)."""
        return [j for j, par in enumerate(self.parents) if par == i]

    def root_children(self) -> list[int]:
        return self.children(-1)

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to node i."""
        out: list[int] = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def preordered(self) -> DraftTree:
        """The same tree re-indexed in depth-first preorder, most probable child first (by
        `probs`, ties by current index). The most probable branch then occupies packed rows
        1..d, so accepting it keeps a contiguous slice of the KV cache."""
        kids = self.child_lists()
        if self.probs is not None:
            probs = self.probs
            for lst in kids:
                lst.sort(key=lambda j: -probs[j])  # stable: ties keep index order
        order: list[int] = []
        stack = kids[0][::-1]
        while stack:
            i = stack.pop()
            order.append(i)
            stack.extend(kids[i + 1][::-1])
        return self._reindexed(order)

    def ranked(self) -> list[int]:
        """Node indices, most probable first (ties: lower index first). Each node is clamped to
        its parent's probability first: p * w / total can round one ulp above p, and a child must
        never outrank its parent (parents precede children, so one pass does it)."""
        if self.probs is None:
            return list(range(len(self.tokens)))
        probs = list(self.probs)
        for j, par in enumerate(self.parents):
            if par >= 0 and probs[j] > probs[par]:
                probs[j] = probs[par]
        return sorted(range(len(probs)), key=lambda j: (-probs[j], j))

    def top(self, k: int) -> DraftTree:
        """The k most probable nodes (ties: lower index first), in the current packed order.
        Since probabilities never increase from parent to child this keeps every kept node's
        ancestors, so the result is a valid tree; it is the best size-k tree under the estimate.
        Without probs, the first k nodes."""
        if k >= len(self.tokens):
            return self
        if self.probs is None:
            keep = list(range(max(k, 0)))
        else:
            keep = sorted(self.ranked()[: max(k, 0)])
        return self._reindexed(keep)

    def _reindexed(self, order: list[int]) -> DraftTree:
        """Keep nodes `order` (every kept node's parent must be kept and come earlier)."""
        new_index = {old: new for new, old in enumerate(order)}
        return DraftTree(
            tokens=[self.tokens[i] for i in order],
            parents=[-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in order],
            probs=None if self.probs is None else [self.probs[i] for i in order],
            matched=None if self.matched is None else [self.matched[i] for i in order],
        )


@dataclass
class PackedStep:
    """One verification forward pass over the root and the tree: N+1 rows.

    input_ids:    [N+1] int64, last committed token then the tree tokens.
    position_ids: [N+1] int64, logical_len for row 0, logical_len + depth for tree rows.
    tree_mask:    [N+1, N+1] bool, row i may attend column j iff j == i or j is an ancestor of
                  i (row 0 is an ancestor of every row). Rows also attend the whole KV cache.
    parent_rows:  [N+1] int64, packed row of each row's parent; -1 for row 0.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    tree_mask: torch.Tensor
    parent_rows: torch.Tensor


def pack(tree: DraftTree, last_token: int, logical_len: int, device: torch.device | str | None = None) -> PackedStep:
    """Lay out a tree for one forward pass. `logical_len` tokens are already in the KV cache
    (positions 0..logical_len-1), so the last committed token sits at position logical_len.
    Tensors are built on the host and copied once each to `device` (default CPU)."""
    tree.validate()
    n = len(tree)
    parent_rows = [-1] + [p + 1 for p in tree.parents]
    depths = [0] * (n + 1)
    # Row r's mask row is its parent's row plus itself: parents precede children, so one pass.
    # Rows are bytes (0/1) joined into one buffer: far cheaper than a nested list of bools.
    rows = [bytearray(n + 1)]
    rows[0][0] = 1
    for r in range(1, n + 1):
        depths[r] = depths[parent_rows[r]] + 1
        row = rows[parent_rows[r]][:]
        row[r] = 1
        rows.append(row)
    mask = torch.frombuffer(bytearray().join(rows), dtype=torch.bool).view(n + 1, n + 1)
    return PackedStep(
        input_ids=torch.tensor([last_token, *tree.tokens], dtype=torch.long, device=device),
        position_ids=torch.tensor([logical_len + d for d in depths], dtype=torch.long, device=device),
        tree_mask=mask.to(device) if device is not None else mask,
        parent_rows=torch.tensor(parent_rows, dtype=torch.long, device=device),
    )


def contiguous_path(rows: Sequence[int]) -> bool:
    """True when accepted packed rows are consecutive (e.g. 1, 2, 3): the KV fix-up is then a
    slice (or nothing at all when they start at row 1), not a gather."""
    return all(b == a + 1 for a, b in zip(rows, rows[1:], strict=False))
