"""The model runner against plain transformers, on the real default model (fp32)."""

import json

import pytest
import torch
from torch import nn
from trieserve.server import matmul
from trieserve.server.model import load_model
from trieserve.server.runner import ModelRunner

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Paris is the capital of France. Berlin is the capital of",
]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def depths(parents: list[int]) -> list[int]:
    out = []
    for p in parents:
        out.append(0 if p == -1 else out[p] + 1)
    return out


def test_tree_step_matches_sequential_paths(runner, tokenizer):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    n = len(ids)
    # row 0: last prompt token; a branching tree of depth 3 with shared prefixes
    tokens = [ids[-1], 11, 22, 33, 44, 55, 66]
    parents = [-1, 0, 0, 1, 1, 2, 4]
    cache = runner.new_cache()
    runner.prefill(cache, ids[:-1])
    pos = torch.tensor([n - 1 + d for d in depths(parents)])
    tree_logits = runner.step(cache, torch.tensor(tokens), pos, ancestor_mask(parents))
    assert cache.get_seq_length() == n - 1 + len(tokens)
    for leaf in (3, 5, 6):
        path = []
        j = leaf
        while j != -1:
            path.insert(0, j)
            j = parents[j]
        seq_cache = runner.new_cache()
        runner.prefill(seq_cache, ids[:-1])
        seq_logits = runner.forward(
            seq_cache, torch.tensor([tokens[p] for p in path]), torch.arange(n - 1, n - 1 + len(path))
        )
        torch.testing.assert_close(tree_logits[path], seq_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_loop_matches_hf_generate(runner, hf_model, tokenizer, prompt):
    ids = tokenizer(prompt)["input_ids"]
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    cache = runner.new_cache()
    logits = runner.prefill(cache, ids)
    out = []
    for i in range(len(expected)):
        tok = int(logits.argmax())
        out.append(tok)
        logits = runner.step(cache, torch.tensor([tok]), torch.tensor([len(ids) + i]), None)[0]
    assert out == expected


def test_keep_path_gathers_a_non_contiguous_branch(runner, tokenizer):
    """After a tree step, keeping a branch that is not contiguous in packed order must leave the
    cache exactly as if only that branch had been run."""
    ids = tokenizer(PROMPTS[1])["input_ids"]
    n = len(ids)
    cont = tokenizer(PROMPTS[1] + " fibonacci(n - 1)")["input_ids"][n:]
    a, b = cont[0], cont[1]
    tokens = [ids[-1], 999, a, 998, b]  # row 2 (a) -> row 4 (b) is the real branch
    parents = [-1, 0, 0, 1, 2]
    cache = runner.new_cache()
    runner.prefill(cache, ids[:-1])
    runner.step(cache, torch.tensor(tokens), torch.tensor([n - 1 + d for d in depths(parents)]), ancestor_mask(parents))
    cache.keep_path(len(tokens), [0, 2, 4])
    assert cache.get_seq_length() == n + 2
    after = runner.step(cache, torch.tensor([cont[2]]), torch.tensor([n + 2]), None)

    ref = runner.new_cache()
    runner.prefill(ref, ids + [a, b])
    expected = runner.step(ref, torch.tensor([cont[2]]), torch.tensor([n + 2]), None)
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=0)


def test_cache_grows_in_place_and_truncates(runner, tokenizer):
    ids = tokenizer(PROMPTS[2])["input_ids"]
    cache = runner.new_cache()
    runner.prefill(cache, ids)
    layer = cache.layers[0]
    cap = layer.capacity
    storage = layer._k.data_ptr()
    runner.step(cache, torch.tensor([5]), torch.tensor([len(ids)]), None)
    if len(ids) + 1 <= cap:
        assert layer._k.data_ptr() == storage, "a decode step must write in place, not reallocate"
    cache.truncate_new(1, 0)
    assert cache.lengths() == [len(ids)] * runner.num_layers


def test_cost_ladder_is_measured_once_then_loaded(runner, tmp_path, monkeypatch):
    from trieserve.server.budget import StepCost

    path = tmp_path / "ladder.json"
    first = StepCost.cached(runner, 4, path)
    assert path.exists() and first.sizes == [1, 2, 3, 4] and all(s > 0 for s in first.seconds)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although a cached ladder exists")

    monkeypatch.setattr(StepCost, "measure", no_measuring)
    again = StepCost.cached(runner, 4, path)
    assert again.sizes == first.sizes and again.seconds == pytest.approx(first.seconds)
    # a ladder for other sizes (another --decoding-length) is not reused
    monkeypatch.undo()
    other = StepCost.cached(runner, 2, path)
    assert other.sizes == [1, 2]


def test_cached_route_measures_once_then_reads_the_file(model_dir, tmp_path, monkeypatch, stream_kernel):
    """The route is measured on the real model at most once per machine key; the choice and the
    timings behind it (stock and both kernels) are in the file, and a second call does not measure."""
    calls = []
    real = matmul.measure_routes

    def counting(runner, *a, **k):
        calls.append(1)
        return real(runner, (2, 3), prefix=16, rounds=1)

    monkeypatch.setattr(matmul, "measure_routes", counting)
    model, _ = load_model(model_dir, "float32", "cpu")  # its own copy: the route is switched on it
    runner = ModelRunner(model, skinny_rows=0)
    path = tmp_path / "matmul" / "key.json"
    route = matmul.cached_route(runner, path)
    kernel, rows, min_rows = route
    assert kernel in matmul.KERNELS and rows in (0, 1, 2, 3) and min_rows in (1, 2) and calls == [1]
    data = json.loads(path.read_text())
    assert data["route"] == list(route) and set(data["timings"]) == {"stock", "skinny", "stream"}
    assert all(set(t) == {"1", "2", "3"} and min(t.values()) > 0 for t in data["timings"].values())
    assert matmul.cached_route(runner, path) == route and calls == [1]
    # a forced kernel is read from the same timings
    assert matmul.cached_route(runner, path, "skinny")[0] == "skinny" and calls == [1]
    runner.set_route(route)
    assert runner.route == (route if rows else matmul.STOCK)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear)) == (rows == 0)
