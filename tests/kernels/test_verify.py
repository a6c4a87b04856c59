import pytest
import torch
from trieserve.kernels import (
    set_backend,
    verify_greedy,
    verify_greedy_reference,
    verify_greedy_triton,
    verify_sampling,
    verify_sampling_reference,
    verify_sampling_triton,
)

V = 12


def make_batch(T, n_rows, gen, random_parents):
    """B packed trees with distinct sibling tokens, plus a favoured root-to-node path per tree
    (so acceptance goes deep). Padding rows hang off the root with the token the root will
    predict: a walk that ignores n_rows would take them."""
    parents, tokens, paths = [], [], []
    for n in n_rows:
        par = random_parents(n, gen)
        tok = [int(torch.randint(V, (1,), generator=gen))]
        for r in range(1, n):
            used = {tok[c] for c in range(1, r) if par[c] == par[r]}
            free = [t for t in range(V) if t not in used]
            tok.append(free[int(torch.randint(len(free), (1,), generator=gen))])
        node = int(torch.randint(n, (1,), generator=gen))
        path = []
        while node >= 0:
            path.append(node)
            node = par[node]
        parents.append(par + [0] * (T - n))
        tokens.append(tok + [-1] * (T - n))
        paths.append(path[::-1])
    return torch.tensor(parents), torch.tensor(tokens), paths


def favour(values, tokens, paths, n_rows, boost):
    """values [B, T, V]: push each row of the favoured path toward its child's token, and the
    root toward the padding rows' token."""
    for b, path in enumerate(paths):
        for row, child in zip(path, path[1:], strict=False):
            values[b, row, tokens[b, child]] += boost
        tokens[b, n_rows[b] :] = values[b, 0].argmax()
    return values


def python_walk(choice, tokens, parents, n):
    """choice(row) -> the model's token at that row."""
    node, path = 0, [0]
    while True:
        want = choice(node)
        kids = [c for c in range(1, n) if parents[c] == node and tokens[c] == want]
        if not kids:
            return len(path) - 1, path, want
        node = kids[0]
        path.append(node)


def check(result, expected, T):
    accept_len, rows, bonus = result
    assert accept_len.dtype == rows.dtype == bonus.dtype == torch.int64
    for b, (n_acc, path, tok) in enumerate(expected):
        assert accept_len[b].item() == n_acc
        assert rows[b].tolist() == path + [-1] * (T - len(path))
        assert bonus[b].item() == tok


def greedy_case(T, seed, device, random_parents):
    gen = torch.Generator().manual_seed(seed)
    n_rows = [T, max(1, T // 2)]
    parents, tokens, paths = make_batch(T, n_rows, gen, random_parents)
    logits = favour(torch.randn(2, T, V, generator=gen), tokens, paths, n_rows, boost=6.0)
    expected = [
        python_walk(lambda r, b=b: int(logits[b, r].argmax()), tokens[b].tolist(), parents[b].tolist(), n)
        for b, n in enumerate(n_rows)
    ]
    args = (logits, tokens, parents, torch.tensor(n_rows))
    return [a.to(device) for a in args], expected


def sampling_case(T, seed, device, random_parents):
    # dyadic probabilities (multiples of 1/1024): every cumulative sum is exact in fp32, so
    # the draw cannot depend on summation order
    gen = torch.Generator().manual_seed(seed)
    n_rows = [T, max(1, T // 2)]
    parents, tokens, paths = make_batch(T, n_rows, gen, random_parents)
    weights = torch.randint(0, 4, (2, T, V), generator=gen).float()
    weights = favour(weights, tokens, paths, n_rows, boost=60.0)
    counts = torch.floor(weights / weights.sum(-1, keepdim=True) * 1024)
    counts[..., 0] += 1024 - counts.sum(-1)
    probs = counts / 1024
    uniforms = torch.rand(2, T, generator=gen)

    def draw(b, r):
        cdf = torch.cumsum(counts[b, r], 0)
        return int((cdf <= uniforms[b, r].double() * 1024).sum())

    expected = [
        python_walk(lambda r, b=b: draw(b, r), tokens[b].tolist(), parents[b].tolist(), n) for b, n in enumerate(n_rows)
    ]
    args = (probs, tokens, parents, torch.tensor(n_rows), uniforms)
    return [a.to(device) for a in args], expected


@pytest.mark.parametrize("T", [1, 3, 15, 33])
def test_reference_matches_python_walk(T, tree_helpers):
    for seed in range(3):
        args, expected = greedy_case(T, seed, "cpu", tree_helpers[0])
        check(verify_greedy_reference(*args), expected, T)
        args, expected = sampling_case(T, seed, "cpu", tree_helpers[0])
        check(verify_sampling_reference(*args), expected, T)


def test_walk_goes_deep(tree_helpers):
    # the fixtures are only useful if acceptance is not always 0
    depths = [greedy_case(33, seed, "cpu", tree_helpers[0])[1][0][0] for seed in range(5)]
    assert max(depths) >= 3


@pytest.mark.triton
@pytest.mark.parametrize("T", [1, 3, 15, 33])
def test_kernel_matches_python_walk(T, device, tree_helpers):
    args, expected = greedy_case(T, T, device, tree_helpers[0])
    check(verify_greedy_triton(*args), expected, T)
    args, expected = sampling_case(T, T, device, tree_helpers[0])
    check(verify_sampling_triton(*args), expected, T)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_dispatch(backend, device, tree_helpers):
    set_backend(backend)
    args, expected = greedy_case(15, 7, device, tree_helpers[0])
    check(verify_greedy(*args), expected, 15)
    args, expected = sampling_case(15, 7, device, tree_helpers[0])
    check(verify_sampling(*args), expected, 15)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_sampling_never_draws_impossible_tokens(impl, device):
    fn = verify_sampling_reference if impl == "reference" else verify_sampling_triton
    probs = torch.tensor([[[0.3, 0.3, 0.0, 0.0]], [[0.0, 0.2, 0.8, 0.0]]], device=device)
    one_row = dict(
        tokens=torch.zeros(2, 1, dtype=torch.int64, device=device),
        parents=torch.full((2, 1), -1, dtype=torch.int64, device=device),
        n_rows=torch.ones(2, dtype=torch.int64, device=device),
    )
    # u just below 1 on an unnormalised row: u * total can round up to the total
    _, _, bonus = fn(probs, uniforms=torch.tensor([[1 - 2**-24], [0.0]], device=device), **one_row)
    assert bonus.tolist() == [1, 1]
