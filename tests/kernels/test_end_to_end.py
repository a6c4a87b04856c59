"""A lookahead generation with the kernels forced through Triton (the interpreter on CPU) gives
the same tokens as with the PyTorch references, on a tiny randomly initialised Llama."""

import importlib
import queue

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trieserve.decoding.draft import DraftConfig
from trieserve.decoding.sampling import SamplingParams
from trieserve.decoding.trie import OutputStore
from trieserve.kernels import dispatch
from trieserve.server.budget import StepCost
from trieserve.server.engine import Engine, EngineConfig
from trieserve.server.runner import ModelRunner
from trieserve.server.sequence import Delta, Finish, GenerationRequest
from trieserve.server.speculation import Speculator

pytestmark = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="triton is not installed")


def tiny_engine(tokenizer) -> Engine:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    draft = DraftConfig(max_match=2, branch_length=4)
    store = OutputStore(capacity=10_000, ngram_len=draft.ngram_len)
    speculator = Speculator(store, draft, decoding_length=6, cost=StepCost([1], [1.0]), adaptive=False)
    engine = Engine(ModelRunner(model), tokenizer, EngineConfig(lookahead=True), speculator=speculator)
    engine.start()
    return engine


def generate(engine, ids):
    events: queue.Queue = queue.Queue()
    engine.submit(GenerationRequest(ids, 24, SamplingParams(temperature=0), ignore_eos=True), events.put)
    tokens = []
    while not isinstance(ev := events.get(timeout=300), Finish):
        if isinstance(ev, Delta):
            tokens += ev.token_ids
    return tokens, ev.stats


def test_lookahead_through_triton_kernels_matches_references(tokenizer, tmp_path, monkeypatch):
    module = importlib.import_module("trieserve.kernels.tree_attention")

    calls = []
    kernel = module.tree_attention_triton
    monkeypatch.setattr(module, "tree_attention_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids = tokenizer.encode("one two three four one two three four one two three four one two")
    engine = tiny_engine(tokenizer)
    warm = tmp_path / "store.trie"
    results = []
    try:
        dispatch.set_backend("reference")
        generate(engine, ids)  # fills the output store, so both runs below draft from the same trie
        engine.speculator.store.save(warm)
        for backend in ("reference", "triton"):
            dispatch.set_backend(backend)
            engine.speculator.store.load(warm)
            results.append(generate(engine, ids))
    finally:
        dispatch.set_backend("auto")
        engine.stop()
    (ref_tokens, ref_stats), (tri_tokens, tri_stats) = results
    assert tri_tokens == ref_tokens
    assert calls, "the Triton kernel never ran"
    assert tri_stats["accepted_tokens"] > 0
    assert tri_stats["draft_tokens"] == ref_stats["draft_tokens"]
