"""Queue bound, cancellation and shutdown, on a real server with a tiny queue."""

import asyncio
import itertools
import time

import httpx
import pytest

from tests.conftest import LiveServer, metric


@pytest.fixture(scope="module")
def small_server(model_dir):
    srv = LiveServer("--max-queue", "1", "--max-num-seqs", "1", "--no-lookahead").wait_ready()
    yield srv
    srv.stop()


def _running(url: str) -> float:
    return metric(url, "trieserve_running_requests")


def test_full_queue_gets_429_with_retry_after(small_server):
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 60, "temperature": 0, "ignore_eos": True}

    async def fire():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(5)))

    responses = asyncio.run(fire())
    codes = sorted(r.status_code for r in responses)
    # one request runs and at most one waits: of five at once, at least three are turned away
    assert codes.count(200) in (1, 2) and codes.count(429) == 5 - codes.count(200), codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["type"] == "rate_limit_error"


def test_n_choices_queue_all_or_none(small_server):
    # n above the queue's size can never be served: a 400, not a 429 to retry forever
    r = httpx.post(small_server.url + "/v1/completions", json={"prompt": "hi", "n": 2, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    # with one request running and one slot free, n=1 fits; afterwards the queue holds nothing stale
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 30, "temperature": 0, "ignore_eos": True}

    async def fire():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(3)))

    codes = sorted(r.status_code for r in asyncio.run(fire()))
    assert codes.count(200) >= 1 and set(codes) <= {200, 429}
    assert metric(small_server.url, "trieserve_queue_length") == 0


def test_client_leaving_a_non_streaming_request_cancels_it(small_server):
    """A client that stops waiting for a whole response (an SDK timeout) frees its sequence within
    a step or so: nobody would read the rest."""
    body = {"prompt": "Write a very long story.", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(small_server.url + "/v1/completions", json=body, timeout=2.0)
    deadline = time.monotonic() + 10
    while _running(small_server.url) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(small_server.url) == 0
    counted = [
        ln for ln in httpx.get(small_server.url + "/metrics").text.splitlines()
        if ln.startswith('trieserve_requests_total{endpoint="/v1/completions",status="499"}')
    ]  # fmt: skip
    assert counted and float(counted[0].split()[-1]) >= 1


def test_client_disconnect_cancels_generation(small_server):
    body = {
        "prompt": "Write a very long story.",
        "max_tokens": 2000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    before = metric(small_server.url, "trieserve_generation_tokens_total")
    with httpx.stream("POST", small_server.url + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    # the engine notices within a step; afterwards nothing is running and a new request is served at once
    deadline = time.monotonic() + 10
    while _running(small_server.url) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(small_server.url) == 0
    # the tokens it generated before it left are counted, like every other request's
    assert metric(small_server.url, "trieserve_generation_tokens_total") - before >= 2
    start = time.monotonic()
    r = httpx.post(
        small_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0}, timeout=60
    )
    assert r.status_code == 200 and time.monotonic() - start < 10


def test_submit_many_queues_every_choice_or_none(runner, tokenizer):
    from trieserve.decoding.sampling import SamplingParams
    from trieserve.server.engine import Engine, EngineConfig
    from trieserve.server.errors import QueueFullError
    from trieserve.server.sequence import GenerationRequest

    engine = Engine(runner, tokenizer, EngineConfig(max_queue=3))  # never started: nothing leaves the queue
    request = GenerationRequest([1, 2, 3], 4, SamplingParams(temperature=0))
    engine.submit(request, lambda ev: None)
    with pytest.raises(QueueFullError):
        engine.submit_many([request] * 3, [lambda ev: None] * 3)  # 1 + 3 > 3: none of the three
    assert engine.queue_length == 1
    seqs = engine.submit_many([request] * 2, [lambda ev: None] * 2)  # 1 + 2 fits
    assert engine.queue_length == 3 and len(seqs) == 2 and seqs[0] is not seqs[1]


def test_a_cancelled_waiting_request_gives_its_place_back_at_once(runner, tokenizer):
    """Clients that time out while queued (and retry) must not fill the queue with requests
    nobody waits for: the room check skips them, the engine ends them on its next pass."""
    import queue as queue_module

    from trieserve.decoding.sampling import SamplingParams
    from trieserve.server.engine import Engine, EngineConfig
    from trieserve.server.errors import QueueFullError
    from trieserve.server.sequence import Finish, GenerationRequest

    engine = Engine(runner, tokenizer, EngineConfig(max_queue=2, max_num_seqs=1))  # not started yet
    request = GenerationRequest(tokenizer.encode("One, two,"), 2, SamplingParams(temperature=0))
    events: list[queue_module.Queue] = [queue_module.Queue() for _ in range(3)]
    first, second = engine.submit(request, events[0].put), engine.submit(request, events[1].put)
    with pytest.raises(QueueFullError):
        engine.submit(request, lambda ev: None)
    first.cancelled.set()  # what the HTTP layer does when its client leaves
    assert engine.queue_length == 1
    engine.submit(request, events[2].put)  # the cancelled one's place
    assert engine.queue_length == 2
    engine.start()
    try:
        ends = [_last_event(q) for q in events]
    finally:
        engine.stop()
    assert isinstance(ends[0], Finish) and ends[0].reason == "cancelled"
    assert [e.reason for e in ends[1:]] == ["length", "length"] and second.output_ids


def _last_event(q, timeout: float = 120):
    from trieserve.server.sequence import Failure, Finish

    while True:
        ev = q.get(timeout=timeout)
        if isinstance(ev, Finish | Failure):
            return ev


def test_tokenizing_a_huge_prompt_does_not_stall_other_streams(small_server):
    """A prompt of megabytes takes seconds to tokenize (then a 400: far over the context); that
    happens off the event loop, so a running stream keeps streaming and /health keeps answering."""
    import threading

    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
    arrivals: list[float] = []
    started = threading.Event()

    def consume():
        with httpx.stream("POST", small_server.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 3:
                        started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(120)
    huge = {"prompt": "hello world " * 300_000, "max_tokens": 1}  # 3.6 MB, ~600k tokens
    sent = time.monotonic()
    health: list[float] = []

    def probe():
        while time.monotonic() - sent < 2.0:
            t0 = time.monotonic()
            assert httpx.get(small_server.url + "/health", timeout=30).status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.1)

    prober = threading.Thread(target=probe)
    prober.start()
    r = httpx.post(small_server.url + "/v1/completions", json=huge, timeout=120)
    tokenizing = (sent, time.monotonic())
    prober.join(60)
    t.join(120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    took = tokenizing[1] - tokenizing[0]
    assert took > 1.0  # it did take a while: the checks below mean something
    # on the event loop, one gap in the stream and one /health call would last the whole
    # tokenization; off it, they stay at a step's time (the bound leaves room for a loaded machine)
    during = [b - a for a, b in itertools.pairwise(arrivals) if tokenizing[0] <= b <= tokenizing[1] + 0.5]
    assert during, "the stream sent nothing while the prompt was tokenized"
    assert max(during) < took / 2, f"a {max(during):.2f} s gap in the stream during {took:.2f} s"
    assert health and max(health) < took / 2, (health, took)
