"""Draft trees: validation, helpers, and packing into one verification pass."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trieserve.decoding.tree import DraftTree, PackedStep, contiguous_path, pack


@st.composite
def trees(draw, max_nodes: int = 24, with_probs: bool = False) -> DraftTree:
    n = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = [draw(st.integers(0, 50)) for _ in range(n)]
    probs = None
    if with_probs:
        # Path probabilities: a child's is its parent's times a factor in (0, 1].
        probs = []
        for par in parents:
            factor = draw(st.sampled_from([1.0, 0.9, 0.5, 0.25, 0.1]))
            probs.append((1.0 if par < 0 else probs[par]) * factor)
    return DraftTree(tokens=tokens, parents=parents, probs=probs)


def ancestors(tree: DraftTree, i: int) -> set[int]:
    out = set()
    while tree.parents[i] >= 0:
        i = tree.parents[i]
        out.add(i)
    return out


def token_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    return sorted(tuple(tree.tokens[j] for j in tree.path(i)) for i in range(len(tree)))


# A branching tree:      root
#                       /    \
#                   0:a=10   3:d=13
#                   /    \        \
#               1:b=11  2:c=12   4:e=14
#                  |
#               5:f=15
BRANCHY = DraftTree(tokens=[10, 11, 12, 13, 14, 15], parents=[-1, 0, 0, -1, 3, 1])


def test_validate_accepts_good_trees():
    BRANCHY.validate()
    DraftTree.empty().validate()
    DraftTree([1, 2], [-1, 0], probs=[0.5, 0.25]).validate()


@pytest.mark.parametrize(
    "tokens, parents, probs, needle",
    [
        ([1, 2], [-1], None, "parents"),
        ([1, 2], [-1, 1], None, "parent 1"),  # its own parent
        ([1, 2], [1, -1], None, "parent 1"),  # parent after child
        ([1], [-2], None, "parent -2"),
        ([-3], [-1], None, "-3"),
        ([1], [-1], [0.5, 0.5], "probs"),
    ],
)
def test_validate_rejects_malformed_trees(tokens, parents, probs, needle):
    with pytest.raises(ValueError, match=needle):
        DraftTree(tokens=tokens, parents=parents, probs=probs).validate()


def test_helpers_on_branching_tree():
    assert len(BRANCHY) == 6
    assert BRANCHY.depths() == [1, 2, 2, 1, 2, 3]
    assert BRANCHY.max_depth() == 3
    assert BRANCHY.root_children() == [0, 3]
    assert BRANCHY.children(0) == [1, 2]
    assert BRANCHY.children(5) == []
    assert BRANCHY.child_lists() == [[0, 3], [1, 2], [5], [], [4], [], []]
    assert BRANCHY.path(5) == [0, 1, 5]
    assert DraftTree.empty().max_depth() == 0 and len(DraftTree.empty()) == 0


def test_pack_chain():
    step = pack(DraftTree([5, 6, 7], [-1, 0, 1]), last_token=4, logical_len=9)
    assert step.input_ids.tolist() == [4, 5, 6, 7]
    assert step.position_ids.tolist() == [9, 10, 11, 12]
    assert torch.equal(step.tree_mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert step.parent_rows.tolist() == [-1, 0, 1, 2]
    assert step.input_ids.dtype == torch.long and step.tree_mask.dtype == torch.bool


def test_pack_branching_tree():
    step = pack(BRANCHY, last_token=99, logical_len=3)
    assert step.input_ids.tolist() == [99, 10, 11, 12, 13, 14, 15]
    assert step.position_ids.tolist() == [3, 4, 5, 5, 4, 5, 6]
    assert step.parent_rows.tolist() == [-1, 0, 1, 1, 0, 4, 2]
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 1],
    ]
    assert step.tree_mask.int().tolist() == expected


def test_pack_empty_tree():
    step = pack(DraftTree.empty(), last_token=7, logical_len=0)
    assert isinstance(step, PackedStep)
    assert step.input_ids.tolist() == [7]
    assert step.position_ids.tolist() == [0]
    assert step.tree_mask.tolist() == [[True]]
    assert step.parent_rows.tolist() == [-1]


def test_pack_rejects_malformed_tree():
    with pytest.raises(ValueError):
        pack(DraftTree([1, 2], [1, -1]), last_token=0, logical_len=0)


@settings(max_examples=40, deadline=None)
@given(tree=trees(), logical_len=st.integers(0, 1000))
def test_pack_mask_is_the_ancestor_relation(tree, logical_len):
    step = pack(tree, last_token=1, logical_len=logical_len)
    n = len(tree)
    mask = step.tree_mask.tolist()
    depths = tree.depths()
    assert mask[0] == [True] + [False] * n
    for i in range(n):
        allowed = {0, i + 1} | {a + 1 for a in ancestors(tree, i)}
        assert {j for j in range(n + 1) if mask[i + 1][j]} == allowed
        assert step.position_ids[i + 1] == logical_len + depths[i]
        assert step.parent_rows[i + 1] == tree.parents[i] + 1


@settings(max_examples=40, deadline=None)
@given(tree=trees(with_probs=True))
def test_preordered_keeps_paths_and_puts_best_branch_first(tree):
    out = tree.preordered()
    out.validate()
    assert token_paths(out) == token_paths(tree)
    assert sorted(out.probs) == sorted(tree.probs)
    # Preorder: every subtree is a contiguous run of rows.
    for i in range(len(out)):
        sub = [j for j in range(len(out)) if i == j or i in ancestors(out, j)]
        assert sub == list(range(i, i + len(sub)))
    # Row 1 onward follows the most probable child at every level.
    i, kids = -1, out.child_lists()
    while kids[i + 1]:
        best = max(out.probs[j] for j in kids[i + 1])
        assert out.probs[kids[i + 1][0]] == best
        i = kids[i + 1][0]


@settings(max_examples=40, deadline=None)
@given(tree=trees(with_probs=True), k=st.integers(0, 30))
def test_top_keeps_the_most_probable_nodes_as_a_tree(tree, k):
    out = tree.top(k)
    out.validate()
    assert len(out) == min(k, len(tree))
    assert sorted(out.probs, reverse=True) == sorted(tree.probs, reverse=True)[: len(out)]
    kept_paths = set(token_paths(out))
    assert kept_paths <= set(token_paths(tree))


def test_contiguous_path():
    assert contiguous_path([])
    assert contiguous_path([4])
    assert contiguous_path([1, 2, 3])
    assert not contiguous_path([1, 3])
    assert not contiguous_path([2, 1])
