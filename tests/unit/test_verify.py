"""Verification: greedy acceptance and exact-in-distribution sampling."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trieserve.decoding.draft import DraftConfig, draft
from trieserve.decoding.sampling import SamplingParams, choose_token, make_generator, next_token_distribution
from trieserve.decoding.tree import DraftTree, pack
from trieserve.decoding.trie import PromptTrie
from trieserve.decoding.verify import Verdict, verify_greedy, verify_sampling

V = 8


def argmax_logits(best: list[int], vocab: int = V) -> torch.Tensor:
    """[len(best), vocab] logits whose row r peaks at best[r]."""
    logits = torch.randn(len(best), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(best)), torch.tensor(best)] = 10.0
    return logits


# root -> 0:a=1 -> 1:b=2 -> 2:c=3 ; root -> 3:x=4 -> 4:y=5
TREE = DraftTree(tokens=[1, 2, 3, 4, 5], parents=[-1, 0, 1, -1, 3])


def test_greedy_full_accept():
    logits = argmax_logits([1, 2, 3, 7, 0, 0])  # rows 0..5
    assert verify_greedy(TREE, logits) == Verdict(tokens=[1, 2, 3, 7], rows=[1, 2, 3])


def test_greedy_partial_accept():
    logits = argmax_logits([1, 2, 6, 0, 0, 0])
    assert verify_greedy(TREE, logits) == Verdict(tokens=[1, 2, 6], rows=[1, 2])


def test_greedy_no_accept():
    logits = argmax_logits([7, 2, 3, 0, 0, 0])
    assert verify_greedy(TREE, logits) == Verdict(tokens=[7], rows=[])


def test_greedy_chooses_the_matching_branch():
    logits = argmax_logits([4, 2, 3, 0, 5, 6])
    assert verify_greedy(TREE, logits) == Verdict(tokens=[4, 5, 6], rows=[4, 5])


def test_greedy_empty_tree():
    logits = argmax_logits([3])
    assert verify_greedy(DraftTree.empty(), logits) == Verdict(tokens=[3], rows=[])


def test_greedy_ties_follow_torch_argmax():
    logits = torch.zeros(2, V)
    logits[0, [2, 5]] = 1.0  # tie between 2 and 5
    expected = int(torch.argmax(logits[0]))
    verdict = verify_greedy(DraftTree([5], [-1]), logits)
    assert verdict.tokens[0] == expected
    assert verdict.rows == ([1] if expected == 5 else [])


def test_greedy_duplicate_siblings_take_the_longest_chain():
    # Two "parallel" chains sharing first tokens: 1 2 3 and 1 2 4; the model wants 1 2 4.
    tree = DraftTree(tokens=[1, 2, 3, 1, 2, 4], parents=[-1, 0, 1, -1, 3, 4])
    logits = argmax_logits([1, 2, 4, 0, 2, 4, 6])  # rows 2 and 5 share the prefix "1 2"
    assert verify_greedy(tree, logits) == Verdict(tokens=[1, 2, 4, 6], rows=[4, 5, 6])


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="logits shape"):
        verify_greedy(TREE, torch.zeros(3, V))
    with pytest.raises(ValueError, match="logits shape"):
        verify_sampling(TREE, torch.zeros(6), SamplingParams(), [], [], None)


@st.composite
def tree_and_path(draw):
    """A tree with distinct sibling tokens (child k of a node has token k) and a node to end at."""
    n = draw(st.integers(1, 20))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    seen: dict[int, int] = {}
    tokens = []
    for par in parents:
        tokens.append(seen.get(par, 0))
        seen[par] = tokens[-1] + 1
    end = draw(st.integers(-1, n - 1))
    return DraftTree(tokens=tokens, parents=parents), end


@settings(max_examples=80, deadline=None)
@given(case=tree_and_path(), seed=st.integers(0, 2**16))
def test_greedy_accepts_exactly_the_path_the_argmax_follows(case, seed):
    tree, end = case
    vocab = len(tree) + 2
    stop = vocab - 1  # never a draft token
    rnd = random.Random(seed)
    best = [rnd.randrange(vocab) for _ in range(len(tree) + 1)]
    path = tree.path(end) if end >= 0 else []
    parent_row = 0
    for i in path:
        best[parent_row] = tree.tokens[i]
        parent_row = i + 1
    best[parent_row] = stop
    verdict = verify_greedy(tree, argmax_logits(best, vocab))
    assert verdict.rows == [i + 1 for i in path]
    assert verdict.tokens == [tree.tokens[i] for i in path] + [stop]
    # Greedy params through the sampling verifier agree.
    assert verify_sampling(tree, argmax_logits(best, vocab), SamplingParams(temperature=0), [], [], None) == verdict


def test_greedy_with_penalties_uses_the_penalised_argmax():
    logits = torch.full((3, V), -5.0)
    logits[0, 1], logits[0, 2] = 3.0, 2.5  # token 1 wins unless penalised
    logits[1, 4] = 3.0
    logits[2, 6] = 3.0
    tree = DraftTree(tokens=[1, 2], parents=[-1, -1])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert verify_greedy(tree, logits).tokens == [1, 4]
    # 1 was already generated: 3.0 / 2 < 2.5, so plain greedy picks 2 and so must verification.
    assert verify_sampling(tree, logits, params, [], [1], None) == Verdict(tokens=[2, 6], rows=[2])


def test_penalties_see_the_tokens_accepted_so_far():
    logits = torch.full((3, V), -5.0)
    logits[0, 1] = 3.0
    logits[1, 1], logits[1, 2] = 3.0, 2.5  # after "1": 1 again, unless the 1 is penalised
    tree = DraftTree(tokens=[1, 1], parents=[-1, 0])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert verify_greedy(tree, logits).tokens == [1, 1, 0]
    assert verify_sampling(tree, logits, params, [], [], None) == Verdict(tokens=[1, 2], rows=[1])


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(len(TREE) + 1, V, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.8, top_k=5, seed=11)
    runs = [
        [verify_sampling(TREE, logits, params, [1], [], gen) for _ in range(20)]
        for gen in (make_generator(11), make_generator(11))
    ]
    assert runs[0] == runs[1]
    assert len({tuple(v.tokens) for v in runs[0]}) > 1  # it does sample


def toy_logits(prefix: tuple[int, ...], vocab: int) -> torch.Tensor:
    """A deterministic toy "model": next-token logits as a function of the prefix."""
    gen = torch.Generator().manual_seed(hash(prefix) % (2**31))
    logits = torch.randn(vocab, generator=gen)
    logits[prefix[-1] % vocab] += 1.5  # likes to repeat, so penalties matter
    return logits


def tree_logits(tree: DraftTree, context: tuple[int, ...], vocab: int) -> torch.Tensor:
    rows = [toy_logits(context, vocab)]
    for i in range(len(tree)):
        rows.append(toy_logits(context + tuple(tree.tokens[j] for j in tree.path(i)), vocab))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=4, top_p=0.95, repetition_penalty=1.5, frequency_penalty=0.5),
    ],
)
def test_sampling_matches_sequential_sampling_in_distribution(params):
    """First two emitted tokens: tree verification vs the exact sequential joint distribution."""
    vocab, ctx, prompt = 5, (3,), [3]
    tree = DraftTree(tokens=[1, 1, 0, 4, 3], parents=[-1, 0, 0, -1, 3])  # two levels, a repeat
    logits = tree_logits(tree, ctx, vocab)
    p1 = next_token_distribution(toy_logits(ctx, vocab), params, prompt, [])
    joint = torch.stack(
        [p1[a] * next_token_distribution(toy_logits(ctx + (a,), vocab), params, prompt, [a]) for a in range(vocab)]
    )
    gen = make_generator(1234)
    trials = 1500
    counts = torch.zeros(vocab, vocab)
    for _ in range(trials):
        tokens = verify_sampling(tree, logits, params, prompt, [], gen).tokens
        if len(tokens) == 1:  # nothing accepted: the next step samples the second token
            tokens.append(choose_token(toy_logits(ctx + (tokens[0],), vocab), params, prompt, tokens, gen))
        counts[tokens[0], tokens[1]] += 1
    expected = joint * trials
    big = expected >= 5
    chi2 = (((counts - expected) ** 2)[big] / expected[big]).sum().item()
    rest = counts[~big].sum().item()
    assert rest <= expected[~big].sum().item() + 4 * (expected[~big].sum().item() + 1) ** 0.5
    dof = int(big.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # ~p < 1e-4 tolerance, fixed seed


def test_lookahead_greedy_generation_equals_plain_greedy():
    """Draft from a prompt trie, pack, run the toy model on each packed row, verify, accept:
    the generated text equals plain greedy decoding token for token."""
    vocab = 12
    rnd = random.Random(5)
    motif = [rnd.randrange(vocab) for _ in range(6)]
    prompt = (motif * 4)[:-1] + [rnd.randrange(vocab) for _ in range(8)]

    def model(tokens: tuple[int, ...]) -> torch.Tensor:
        # Prefers continuing the motif, so drafts get accepted, but not always.
        logits = toy_logits(tokens[-2:], vocab)
        if tokens[-1] in motif:
            logits[motif[(motif.index(tokens[-1]) + 1) % len(motif)]] += 2.0
        return logits

    plain = list(prompt)
    while len(plain) < len(prompt) + 30:
        plain.append(int(torch.argmax(model(tuple(plain)))))

    trie = PromptTrie(prompt, ngram_len=8)
    seq, accepted_drafts = list(prompt), 0
    while len(seq) < len(prompt) + 30:
        tree = draft(seq, 10, DraftConfig(max_match=3, branch_length=5), trie, None)
        step = pack(tree, seq[-1], len(seq) - 1)
        prefixes = [tuple(seq)] + [tuple(seq) + tuple(tree.tokens[j] for j in tree.path(i)) for i in range(len(tree))]
        assert step.input_ids.tolist() == [seq[-1], *tree.tokens]
        verdict = verify_greedy(tree, torch.stack([model(p) for p in prefixes]))
        accepted_drafts += len(verdict.rows)
        old = len(seq)
        seq += verdict.tokens
        trie.insert(seq, old)
    assert seq[: len(plain)] == plain
    assert accepted_drafts > 5  # the drafts did help
