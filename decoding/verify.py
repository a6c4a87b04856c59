"""Verification: which draft tokens the target model agrees with, given one forward pass.

Both verifiers walk the tree from the root one level at a time, keeping the set of nodes
whose path so far has been accepted. Usually that set has one node; it has more only when
siblings repeat a token (e.g. "parallel" drafts, whose chains share first tokens), and since
those nodes share the same prefix, following all of them loses nothing and stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from trieserve.decoding.sampling import SamplingParams, choose_token
from trieserve.decoding.tree import DraftTree


@dataclass
class Verdict:
    """tokens: accepted draft tokens then exactly one bonus token (len == len(rows) + 1).
    rows: packed rows (1..N) of the accepted draft nodes, root-to-leaf order."""

    tokens: list[int]
    rows: list[int]


def _row_children(tree: DraftTree) -> list[list[int]]:
    """Children by packed row, as packed rows: entry r lists the rows whose parent is row r."""
    out: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    for i, par in enumerate(tree.parents):
        out[par + 1].append(i + 1)
    return out


def _path_rows(tree: DraftTree, row: int) -> list[int]:
    rows: list[int] = []
    while row > 0:
        rows.append(row)
        row = tree.parents[row - 1] + 1
    return rows[::-1]


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> Verdict:
    """Accept the longest path whose every token equals the argmax of its parent row's logits.

    logits: [N+1, V] any float dtype/device; row r holds the next-token logits after row r's
    prefix. The bonus token is the argmax of the last accepted row (row 0 when nothing is
    accepted). Ties follow torch.argmax, as plain greedy decoding does. One argmax over all
    rows and a single device-to-host transfer.
    """
    if logits.dim() != 2 or logits.shape[0] != len(tree) + 1:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match a tree of {len(tree)} nodes")
    best = torch.argmax(logits, dim=-1).tolist()  # the one sync
    kids = _row_children(tree)
    tokens = tree.tokens
    frontier = [0]
    while True:
        nxt = [c for r in frontier for c in kids[r] if tokens[c - 1] == best[r]]
        if not nxt:
            break
        frontier = nxt
    # Every frontier node ends an accepted path of maximal depth; take the first in packed order.
    end = frontier[0]
    rows = _path_rows(tree, end)
    return Verdict(tokens=[tokens[r - 1] for r in rows] + [best[end]], rows=rows)


def verify_sampling(
    tree: DraftTree,
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    generator: torch.Generator | None,
) -> Verdict:
    """Exact-in-distribution verification for any SamplingParams.

    At the current node draw t = choose_token(logits[row], params, prompt_ids, output_ids +
    accepted so far, generator), the same draw plain decoding makes at that prefix. If a child
    has token t, accept it and descend; otherwise t is the bonus token and the walk stops.
    So the emitted tokens are distributed exactly as sequential sampling's.

    logits: [N+1, V]. Rows are read one per accepted level; when the generator lives on another
    device than the logits, each visited row is copied to the generator's device (one sync per
    level, the same as plain sampling per token). Greedy params without penalties take the
    single-sync greedy path.
    """
    if logits.dim() != 2 or logits.shape[0] != len(tree) + 1:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match a tree of {len(tree)} nodes")
    if params.greedy and not params.has_penalties:
        return verify_greedy(tree, logits)
    kids = _row_children(tree)
    tokens = tree.tokens
    accepted: list[int] = []
    frontier = [0]
    while True:
        # All frontier rows share one prefix, so any one of them gives the right distribution.
        row_logits = logits[frontier[0]]
        if generator is not None and row_logits.device != generator.device:
            row_logits = row_logits.to(generator.device)
        t = choose_token(row_logits, params, prompt_ids, [*output_ids, *accepted], generator)
        nxt = [c for r in frontier for c in kids[r] if tokens[c - 1] == t]
        if not nxt:
            rows = _path_rows(tree, frontier[0])
            return Verdict(tokens=[*accepted, t], rows=rows)
        accepted.append(t)
        frontier = nxt
