"""Continuous batching on the real model: a sequence's greedy output in a batch is the same as
when it is served alone, whatever else is in the batch."""

import inspect
import json
import threading
import time

import pytest
from trieserve.decoding.sampling import SamplingParams
from trieserve.server.builder import build_engine
from trieserve.server.sequence import Delta, Finish, GenerationRequest
from trieserve.server.settings import Settings


@pytest.fixture(scope="module")
def engine():
    eng, _ = build_engine(
        Settings(max_num_seqs=4, adaptive_budget=False, decoding_length=16, branch_length=6, prefill_chunk=64)
    )
    yield eng
    eng.stop()


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.finish = None

    def __call__(self, ev) -> None:
        if isinstance(ev, Delta):
            self.tokens += ev.token_ids
        elif isinstance(ev, Finish):
            self.finish = ev
            self.done.set()
        else:
            self.error = ev
            self.done.set()


def requests(tokenizer):
    src = inspect.getsource(json.JSONDecoder.raw_decode)
    short = tokenizer.encode("The capital of France is")
    code = tokenizer.encode(f"Repeat this:\n{src}\nAgain:\n")
    chat = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "List three fruits."}], add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
    )
    greedy = SamplingParams(temperature=0)
    return [
        GenerationRequest(short, 20, greedy, lookahead=False, ignore_eos=True),
        GenerationRequest(code, 28, greedy, lookahead=True),
        GenerationRequest(chat, 24, greedy, lookahead=True),
        GenerationRequest(code[:150], 24, greedy, lookahead=False, kv_policy="defensive", kv_budget=0.6),
    ]


def solo(engine, req):
    c = Collector()
    engine.submit(req, c)
    assert c.done.wait(300)
    return c.tokens


def test_batched_greedy_equals_solo(engine, tokenizer):
    reqs = requests(tokenizer)
    alone = [solo(engine, r) for r in reqs]
    collectors = [Collector() for _ in reqs]
    for r, c in zip(reqs, collectors, strict=True):
        engine.submit(r, c)
    for c in collectors:
        assert c.done.wait(300)
    assert [c.tokens for c in collectors] == alone
    assert collectors[1].finish.stats["accepted_tokens"] > 0


def test_batched_steps_teach_the_cost_model_by_batch_size(engine, tokenizer):
    """The engine reports each decode step's batch size to the cost model: steps of several
    sequences learn that batch size's real/ladder ratios (a lone sequence's steps feed the ladder)."""
    cost = engine.speculator.cost
    assert cost is not None
    cost.batched.clear()
    chat, code = requests(tokenizer)[2], requests(tokenizer)[1]
    collectors = [Collector() for _ in range(3)]
    for r, c in zip([chat, code, chat], collectors, strict=True):
        engine.submit(r, c)
    for c in collectors:
        assert c.done.wait(300)
    assert cost.batched, "no batched step reached the cost model"
    assert 1 not in cost.batched and all(2 <= seqs <= 3 for seqs in cost.batched)
    ratios = [r for pair in cost.batched.values() for r in pair if r is not None]
    assert ratios and all(r > 0 for r in ratios)


def test_cancel_mid_batch_leaves_others_unchanged(engine, tokenizer):
    reqs = requests(tokenizer)
    alone = [solo(engine, r) for r in reqs[:3]]
    victim = Collector()
    collectors = [Collector() for _ in range(3)]
    seqs = [engine.submit(r, c) for r, c in zip(reqs[:3], collectors, strict=True)]
    doomed = engine.submit(
        GenerationRequest(reqs[1].prompt_ids, 200, SamplingParams(temperature=0), ignore_eos=True), victim
    )
    while len(victim.tokens) < 3 and not victim.done.is_set():
        victim.done.wait(0.05)
    doomed.cancelled.set()
    assert victim.done.wait(60) and victim.finish.reason == "cancelled"
    for c in collectors:
        assert c.done.wait(300)
    assert [c.tokens for c in collectors] == alone
    assert all(s.cache is None for s in seqs)


def test_long_prompt_does_not_stall_running_streams(engine, tokenizer):
    """With 64-token prefill chunks, a ~640-token prompt is prefilled in ~10 chunks between
    decode steps: the running stream's longest pause is far below the whole prefill."""
    long_ids = tokenizer.encode(inspect.getsource(json.JSONEncoder))[:640]
    alone = Collector()
    engine.submit(GenerationRequest(long_ids, 1, SamplingParams(temperature=0)), alone)
    assert alone.done.wait(300)
    full_prefill = alone.finish.stats["prefill_s"]

    stamps: list[float] = []
    streaming = Collector()

    def on_event(ev):
        if isinstance(ev, Delta):
            stamps.append(time.monotonic())
        streaming(ev)

    running = engine.submit(
        GenerationRequest(tokenizer.encode("Count: 1, 2, 3,"), 400, SamplingParams(temperature=0), ignore_eos=True),
        on_event,
    )
    while len(stamps) < 5:
        time.sleep(0.01)
    late = Collector()
    submitted = time.monotonic()
    engine.submit(GenerationRequest(long_ids, 4, SamplingParams(temperature=0)), late)
    assert late.done.wait(300)
    finished = time.monotonic()
    running.cancelled.set()
    assert streaming.done.wait(60)
    during = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if submitted < b <= finished]
    assert during, "the running stream produced no tokens while the long prompt was prefilled"
    assert max(during) < full_prefill / 2, (max(during), full_prefill)


def test_short_prompts_waiting_together_are_prefilled_in_one_round(runner, tokenizer):
    """Three short prompts (under one 64-token chunk together) all get their first token in the
    first round; a prompt longer than a chunk still advances one chunk per round."""
    from trieserve.server.engine import Engine, EngineConfig

    engine = Engine(runner, tokenizer, EngineConfig(max_num_seqs=4, lookahead=False))  # not started: rounds by hand
    short = [tokenizer.encode(t) for t in ("One, two,", "Red, green,", "Alpha, beta,")]
    long = tokenizer.encode(inspect.getsource(json.dumps))[:150]  # 3 chunks of 64
    seqs = [engine.submit(GenerationRequest(ids, 4, SamplingParams(temperature=0)), lambda ev: None) for ids in short]
    engine._admit()
    engine._round()
    assert all(s.prefilled and len(s.output_ids) == 1 for s in seqs)

    slow = engine.submit(GenerationRequest(long, 4, SamplingParams(temperature=0)), lambda ev: None)
    engine._admit()
    rounds = 0
    while not slow.prefilled:
        engine._round()
        rounds += 1
    assert rounds == 3


def test_decode_rows_ride_in_the_prefill_chunk_s_forward(runner, tokenizer):
    """A round with both a running sequence and a prompt still prefilling is one forward that
    carries the decode row and the chunk: the running stream gains a token in every round of
    the other's prefill, and its tokens are the ones it produces alone."""
    from trieserve.server.engine import Engine, EngineConfig

    engine = Engine(runner, tokenizer, EngineConfig(max_num_seqs=4, lookahead=False))  # not started: rounds by hand
    count = tokenizer.encode("Count: 1, 2, 3,")
    alone = engine.submit(GenerationRequest(count, 6, SamplingParams(temperature=0), ignore_eos=True), lambda ev: None)
    engine._admit()
    while not alone.done:
        engine._round()
    expected = list(alone.output_ids)
    engine._end(alone)

    calls = []
    step_batch = runner.step_batch
    runner.step_batch = lambda caches, parts: (
        calls.append([p.input_ids.numel() for p in parts]) or step_batch(caches, parts)
    )
    try:
        running = engine.submit(
            GenerationRequest(count, 6, SamplingParams(temperature=0), ignore_eos=True), lambda ev: None
        )
        engine._admit()
        engine._round()  # its own prefill
        long = tokenizer.encode(inspect.getsource(json.dumps))[:150]  # 3 chunks of 64
        slow = engine.submit(GenerationRequest(long, 2, SamplingParams(temperature=0)), lambda ev: None)
        engine._admit()
        calls.clear()
        for _ in range(3):
            engine._round()
        assert slow.prefilled
        assert calls == [[1, 64], [1, 64], [1, 22]], calls  # one forward per round: decode row + chunk
        assert len(running.output_ids) == 4  # its first token, then one per round
        while not running.done:
            engine._round()
        assert running.output_ids == expected
    finally:
        runner.step_batch = step_batch


def test_the_engine_thread_built_the_model_and_takes_calls(engine):
    """build_engine loads the model on the thread that runs the loop, and `call` hands work to
    that thread (one thread runs all torch work: see server/engine.py)."""
    thread = engine.call(threading.current_thread)
    assert thread is not threading.current_thread() and thread is engine.built_on

    def boom():
        raise ValueError("raised on the engine thread")

    with pytest.raises(ValueError, match="engine thread"):
        engine.call(boom)
    # the loop is still serving after a failed call
    c = Collector()
    engine.submit(
        GenerationRequest(
            prompt_ids=[1, 2, 3, 4], max_tokens=3, params=SamplingParams(temperature=0.0), ignore_eos=True
        ),
        c,
    )
    assert c.done.wait(60) and len(c.tokens) == 3


def test_build_errors_are_raised_to_the_caller(tmp_path):
    with pytest.raises(Exception, match="not a local HuggingFace model folder"):
        build_engine(Settings(model=str(tmp_path / "no-such-model")))


def test_calls_after_the_loop_ended_run_in_the_caller(runner, tokenizer):
    from trieserve.server.engine import Engine, EngineConfig

    eng = Engine(runner, tokenizer, EngineConfig(lookahead=False))
    eng.start()
    assert eng.call(threading.current_thread) is eng._thread
    eng.stop()
    assert eng.call(threading.current_thread) is threading.current_thread()  # no hang, no engine thread


def test_decode_rows_and_trees_share_one_attention_kernel_call_that_agrees_with_sdpa(runner, tokenizer, stream_kernel):
    """A step of one-row parts, lookahead trees and a prefill chunk, with the C++ kernels: the
    rows and trees in one tree-attention call per layer (the chunk on SDPA), every part's rows
    appended by the kernel; logits as with SDPA per sequence (fp32 summation order apart) and the
    same argmax, in a mixed step, a step of trees and one-row parts, and an all-one-row step."""
    import copy

    import torch
    from trieserve.server.batch import StepRows

    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "def add(a, b):\n    return", "1, 2, 3,")]
    prompts.append(tokenizer.encode(inspect.getsource(json.dumps))[:300])  # two 256-key blocks
    caches = []
    for ids in prompts:
        cache = runner.new_cache()
        runner.prefill(cache, ids)
        caches.append(cache)
    rows = [StepRows(torch.tensor([ids[-1]]), torch.tensor([len(ids)]), None) for ids in prompts]
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]]).bool()
    tree = StepRows(torch.tensor([5, 6, 7]), torch.tensor([3, 4, 4]), mask)
    tree_cache = runner.new_cache()
    runner.prefill(tree_cache, prompts[0][:3])
    # a tree whose new rows straddle the kernel's 256-key blocks (rows 254..259 of its cache)
    chain = torch.ones(6, 6, dtype=torch.bool).tril_()
    chain[3:, 1:3] = False  # rows 3..5 branch off after row 0
    long_tree = StepRows(torch.tensor(prompts[3][254:260]), torch.tensor([254, 255, 256, 255, 256, 257]), chain)
    long_cache = runner.new_cache()
    runner.prefill(long_cache, prompts[3][:254])
    chunk = StepRows(torch.tensor(prompts[1]), torch.arange(len(prompts[1])), None)
    assert runner.step_attention is None  # the fixture's runner: SDPA unless set
    calls = []

    def kernel(query, keys, values, row_part, visible, scale):
        calls.append((len(keys), query.shape[0]))
        return stream_kernel.tree_attention(query, keys, values, row_part, visible, scale)

    cases = (
        (rows + [tree, chunk, long_tree], caches + [tree_cache, runner.new_cache(), long_cache], 6, 4 + 3 + 6),
        (rows + [tree], caches + [tree_cache], 5, 4 + 3),
        (rows, caches, 4, 4),
    )
    for parts, kv, parts_in_kernel, rows_in_kernel in cases:
        reference = runner.step_batch(copy.deepcopy(kv), parts)
        runner.use_kernels(stream_kernel)
        runner.step_attention = kernel
        calls.clear()
        try:
            got = runner.step_batch(copy.deepcopy(kv), parts)
        finally:
            runner.use_kernels(None)
        assert calls == [(parts_in_kernel, rows_in_kernel)] * runner.num_layers  # one call per layer
        for ref, logits in zip(reference, got, strict=True):
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
            assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_the_served_engine_takes_the_decode_kernels(engine, stream_kernel):
    assert engine.runner.step_attention is not None and engine.runner.append_rows is not None
