"""Lookahead through the engine on the real model: lossless greedy, exact seeded sampling."""

import inspect
import json
import queue
import random

import pytest
import torch
from trieserve.decoding.sampling import SamplingParams
from trieserve.server.builder import build_engine
from trieserve.server.sequence import Finish, GenerationRequest
from trieserve.server.settings import Settings

from tests.model.engine_io import run_request


@pytest.fixture(scope="module")
def engine():
    # the full budget every step (no adaptive sizing), so every test exercises real trees
    eng, _ = build_engine(Settings(adaptive_budget=False, decoding_length=24, branch_length=8))
    yield eng
    eng.stop()


def generate(engine, ids, max_tokens, lookahead, params=None):
    return run_request(
        engine, GenerationRequest(ids, max_tokens, params or SamplingParams(temperature=0), lookahead=lookahead)
    )


def copy_prompt(tokenizer):
    src = inspect.getsource(json.JSONEncoder.iterencode)
    msgs = [{"role": "user", "content": f"Repeat this code exactly:\n```python\n{src}\n```"}]
    return tokenizer.encode(
        tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )


def test_greedy_lookahead_is_token_identical_on_copy_prompt(engine, tokenizer, hf_model):
    ids = copy_prompt(tokenizer)
    plain, fin_plain = generate(engine, ids, 64, lookahead=False)
    fast, fin_fast = generate(engine, ids, 64, lookahead=True)
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids) :].tolist()
    assert plain == ref
    assert fast == ref
    assert fin_fast.stats["draft_tokens"] > 0 and fin_fast.stats["accepted_tokens"] > 10
    assert fin_fast.stats["forward_passes"] < fin_plain.stats["forward_passes"]
    assert fin_fast.stats["tokens_per_forward"] > 1.2


def test_greedy_lookahead_randomized_prompts(engine, tokenizer):
    """Random real-text windows plus random token ids: drafts come from the shared store (warmed
    by earlier outputs) and the prompt; output must match plain greedy every time."""
    rng = random.Random(0)
    text = inspect.getsource(json.decoder)
    for _ in range(3):
        start = rng.randrange(0, len(text) - 600)
        ids = tokenizer.encode(text[start : start + rng.randrange(200, 600)])
        ids += [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 5))]
        n = rng.randrange(16, 32)
        plain, _ = generate(engine, ids, n, lookahead=False)
        fast, fin = generate(engine, ids, n, lookahead=True)
        assert fast == plain, f"mismatch on a prompt of {len(ids)} tokens"


def test_seeded_sampling_identical_with_and_without_lookahead(engine, tokenizer):
    """Each emitted token is one draw from its exact distribution, in the same order, so with the
    same seed lookahead sampling reproduces plain sampling token for token."""
    ids = copy_prompt(tokenizer)
    params = SamplingParams(temperature=0.7, top_p=0.95, top_k=50, seed=42, repetition_penalty=1.05)
    plain, _ = generate(engine, ids, 32, lookahead=False, params=params)
    fast, fin = generate(engine, ids, 32, lookahead=True, params=params)
    again, _ = generate(engine, ids, 32, lookahead=True, params=params)
    assert fast == plain == again
    assert fin.stats["draft_tokens"] > 0


def test_stop_string_inside_accepted_chunk(engine, tokenizer):
    ids = copy_prompt(tokenizer)
    plain, _ = generate(engine, ids, 40, lookahead=False)
    text = tokenizer.decode(plain, skip_special_tokens=True)
    stop = text[40:46]
    req = dict(max_tokens=40, params=SamplingParams(temperature=0), stop=[stop])
    outs = []
    for la in (False, True):
        events: queue.Queue = queue.Queue()
        engine.submit(GenerationRequest(ids, lookahead=la, **req), events.put)
        chunks = []
        while not isinstance(ev := events.get(timeout=300), Finish):
            chunks.append(ev.text)
        outs.append(("".join(chunks), ev.completion_tokens, ev.reason))
    assert outs[0] == outs[1]
    assert outs[0][0] == text[: text.index(stop)] and outs[0][2] == "stop"
