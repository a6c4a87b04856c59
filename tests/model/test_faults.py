"""An exception inside one sequence's step fails that request only."""

import threading

from trieserve.decoding.sampling import SamplingParams
from trieserve.server.builder import build_engine
from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest
from trieserve.server.settings import Settings


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if isinstance(ev, Delta):
            self.tokens += ev.token_ids
        if isinstance(ev, (Finish, Failure)):
            self.done.set()


def solo_tokens(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens, served alone."""
    alone = []
    for ids in prompts:
        c = Collector()
        engine.submit(GenerationRequest(ids, max_tokens, SamplingParams(temperature=0), ignore_eos=True), c)
        assert c.done.wait(120)
        alone.append(c.tokens)
    return alone


def test_injected_fault_fails_one_sequence_only(tokenizer):
    engine, _ = build_engine(Settings(max_num_seqs=4, lookahead=False))
    try:
        prompts = [tokenizer.encode(t) for t in ("One, two,", "Red, green,", "Alpha, beta,")]
        alone = solo_tokens(engine, prompts, 12)

        poisoned = prompts[1]

        def hook(seq):
            if seq.prompt_ids == poisoned and len(seq.output_ids) >= 3:
                raise RuntimeError("injected fault")

        engine.fault_hook = hook
        collectors = [Collector() for _ in prompts]
        for ids, c in zip(prompts, collectors, strict=True):
            engine.submit(GenerationRequest(ids, 12, SamplingParams(temperature=0), ignore_eos=True), c)
        for c in collectors:
            assert c.done.wait(120)
    finally:
        engine.stop()
    failure = collectors[1].events[-1]
    assert isinstance(failure, Failure) and "injected fault" in str(failure.error)
    assert collectors[0].tokens == alone[0] and collectors[2].tokens == alone[2]
    assert isinstance(collectors[0].events[-1], Finish) and isinstance(collectors[2].events[-1], Finish)
    assert not engine.running


def test_a_fault_after_the_shared_forward_fails_one_sequence_only(tokenizer, monkeypatch):
    """Past the batch's one forward, each sequence's own work (its first token after a prefill
    chunk, choosing its next token) that raises fails that sequence, not the step's others."""
    from trieserve.server import engine as engine_module

    engine, _ = build_engine(Settings(max_num_seqs=4, lookahead=False))
    try:
        prompts = [tokenizer.encode(t) for t in ("One, two,", "Red, green,", "Alpha, beta,", "Mon, Tue,")]
        alone = solo_tokens(engine, prompts, 10)
        real_choose = engine_module.choose_token
        at_first, at_third = prompts[1], prompts[2]

        def choose(logits, params, prompt_ids, output_ids, generator):
            if (prompt_ids == at_first and not output_ids) or (prompt_ids == at_third and len(output_ids) == 3):
                raise RuntimeError("fault in one sequence")
            return real_choose(logits, params, prompt_ids, output_ids, generator)

        monkeypatch.setattr(engine_module, "choose_token", choose)
        collectors = [Collector() for _ in prompts]
        engine.submit_many(
            [GenerationRequest(ids, 10, SamplingParams(temperature=0), ignore_eos=True) for ids in prompts], collectors
        )  # all four queued at once: their prompts share one prefill chunk, then decode together
        for c in collectors:
            assert c.done.wait(120)
    finally:
        engine.stop()
    for i in (1, 2):
        assert isinstance(collectors[i].events[-1], Failure), collectors[i].events[-1]
        assert "fault in one sequence" in str(collectors[i].events[-1].error)
    assert collectors[1].tokens == [] and collectors[2].tokens == alone[2][:3]
    for i in (0, 3):
        assert isinstance(collectors[i].events[-1], Finish) and collectors[i].tokens == alone[i]
    assert not engine.running


def test_a_failing_round_fails_its_requests_and_the_engine_keeps_serving(tokenizer):
    """A bug outside any one sequence's step (here: metrics that raise) must not kill the worker
    thread and leave every client waiting forever."""

    class BrokenMetrics:
        broken = True

        def __getattr__(self, name):
            def record(*args, **kwargs):
                if BrokenMetrics.broken and name == "finished":
                    raise RuntimeError("metrics exploded")

            return record

    engine, _ = build_engine(Settings(lookahead=False), metrics=BrokenMetrics())
    try:
        ids = tokenizer.encode("One, two,")
        first = Collector()
        engine.submit(GenerationRequest(ids, 4, SamplingParams(temperature=0), ignore_eos=True), first)
        assert first.done.wait(120)
        assert isinstance(first.events[-1], Failure) and "metrics exploded" in str(first.events[-1].error)
        BrokenMetrics.broken = False
        second = Collector()
        engine.submit(GenerationRequest(ids, 4, SamplingParams(temperature=0), ignore_eos=True), second)
        assert second.done.wait(120)
        assert isinstance(second.events[-1], Finish) and len(second.tokens) == 4
        assert not engine.running
    finally:
        engine.stop()


def test_a_cancelled_waiting_request_whose_end_fails_does_not_stop_the_engine(tokenizer):
    """Waiting requests whose clients left are ended between rounds; a failure there (here: the
    metrics, for that one request) fails that request, and the worker keeps serving."""
    target: dict = {}

    class Metrics:
        def __getattr__(self, name):
            def record(*args, **kwargs):
                if name == "finished" and args and args[0] is target.get("seq"):
                    raise RuntimeError("metrics exploded")

            return record

    engine, _ = build_engine(Settings(lookahead=False, max_num_seqs=1), metrics=Metrics())
    try:
        ids = tokenizer.encode("One, two,")
        running = Collector()
        engine.submit(GenerationRequest(ids, 40, SamplingParams(temperature=0), ignore_eos=True), running)
        waiting = Collector()  # queued behind the running one: one place in the batch
        target["seq"] = engine.submit(GenerationRequest(ids, 4, SamplingParams(temperature=0)), waiting)
        target["seq"].cancelled.set()
        assert waiting.done.wait(120)
        assert isinstance(waiting.events[-1], Failure) and "metrics exploded" in str(waiting.events[-1].error)
        later = Collector()
        engine.submit(GenerationRequest(ids, 4, SamplingParams(temperature=0), ignore_eos=True), later)
        assert later.done.wait(120) and running.done.wait(120)
        assert isinstance(later.events[-1], Finish) and len(later.tokens) == 4
        assert isinstance(running.events[-1], Finish) and len(running.tokens) == 40
    finally:
        engine.stop()
