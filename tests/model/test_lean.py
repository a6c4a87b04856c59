"""The lean forward (server/lean.py) gives the transformers forward's logits bit for bit."""

from __future__ import annotations

import pytest
import torch
from trieserve.server.batch import StepRows
from trieserve.server.lean import LeanLlama, supports
from trieserve.server.model import load_model
from trieserve.server.runner import ModelRunner


@pytest.fixture(scope="module")
def runners(model_dir):
    """(lean, transformers) runners over one model: the lean one fuses the weights in place,
    and the transformers forward reads the same (viewed) weights."""
    model, _ = load_model(model_dir, "float32", "cpu")
    lean = ModelRunner(model, prefill_chunk=64, skinny_rows=0)
    plain = ModelRunner(model, prefill_chunk=64, skinny_rows=0, lean=False)
    assert isinstance(lean.lean, LeanLlama) and plain.lean is None
    return lean, plain


PROMPT = [(7 * i * i + 3 * i + 11) % 40000 + 100 for i in range(150)]


def test_the_default_model_takes_the_lean_forward(runner):
    assert supports(runner.model) and runner.lean is not None


def test_fused_weights_add_no_memory(runners):
    layer = runners[0].model.model.layers[0]
    q, k, v = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    gate, up = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight
    assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    ("skinny", "kernel", "min_rows"), [(0, "skinny", 2), (8, "skinny", 2), (8, "stream", 2), (8, "stream", 1)]
)
def test_prefill_step_and_tree_step_match_bit_for_bit(runners, skinny, kernel, min_rows, request):
    if kernel == "stream":
        request.getfixturevalue("stream_kernel")
    for r in runners:
        r.set_skinny_rows(skinny, kernel, min_rows)
    try:
        _compare_steps(runners)
    finally:
        for r in runners:
            r.set_skinny_rows(0)


def _compare_steps(runners):
    caches = [r.new_cache() for r in runners]
    logits = [r.prefill(c, PROMPT) for r, c in zip(runners, caches, strict=True)]  # 3 chunks of 64
    assert torch.equal(logits[0], logits[1])
    # a one-row step, then a 6-row tree ([last] + two branches)
    one = [r.step(c, torch.tensor([42]), torch.tensor([150]), None) for r, c in zip(runners, caches, strict=True)]
    assert torch.equal(one[0], one[1])
    mask = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )  # fmt: skip
    ids, pos = torch.tensor([9, 300, 301, 500, 501, 502]), torch.tensor([151, 152, 153, 152, 153, 154])
    tree = [r.step(c, ids, pos, mask) for r, c in zip(runners, caches, strict=True)]
    assert torch.equal(tree[0], tree[1])
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_lean_logits_match_an_unfused_transformers_model(runners, hf_model):
    """Against a separately loaded model whose weights were never fused (the fused rows must be
    the right rows in the right order)."""
    ids = torch.tensor([PROMPT[:40]])
    expected = hf_model(input_ids=ids).logits[0].float()
    got = runners[0].forward(runners[0].new_cache(), ids[0], torch.arange(40))
    assert torch.equal(got, expected)


def test_unsupported_models_take_the_transformers_forward(model_dir, hf_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert ModelRunner(model, skinny_rows=0).lean is None  # only CPU fp32 is checked bit for bit
    config = hf_model.config  # fp32, unfused: supported until one property changes
    assert supports(hf_model)
    for name, value in (("model_type", "not-llama"), ("mlp_bias", True), ("quantization_config", {"bits": 8})):
        before = getattr(config, name, None)
        setattr(config, name, value)
        try:
            assert not supports(hf_model), name
        finally:
            setattr(config, name, before)
    assert supports(hf_model)


def test_batched_step_matches_bit_for_bit(runners):
    out = []
    for r in runners:
        caches = [r.new_cache() for _ in range(3)]
        for n, c in zip((40, 90, 17), caches, strict=True):
            r.prefill(c, PROMPT[:n])
        parts = [
            StepRows(torch.tensor([5]), torch.tensor([40]), None),
            StepRows(torch.tensor([6, 7, 8]), torch.tensor([90, 91, 91]), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)),
            StepRows(torch.tensor(PROMPT[17:30]), torch.arange(17, 30), None, logits_rows=slice(12, 13)),
        ]  # fmt: skip
        out.append(r.step_batch(caches, parts))
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)
