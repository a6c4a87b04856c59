"""The load-test client: metrics math, Prometheus diffing, datasets, arrivals, and an end-to-end
run against a small in-process fake OpenAI streaming server (a test double for the client only)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import socket
import statistics
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from trieserve.server import loadtest as lt

# ------------------------------------------------------------------ metrics math


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy_linear(n):
    rng = random.Random(n)
    xs = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert lt.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_empty_is_none():
    assert lt.percentile([], 50) is None


def test_tpot_excludes_first_token():
    assert lt.tpot(e2el=1.0, ttft=0.1, completion_tokens=10) == pytest.approx(0.1)
    assert lt.tpot(e2el=1.0, ttft=0.1, completion_tokens=1) is None
    assert lt.tpot(e2el=1.0, ttft=None, completion_tokens=5) is None


def _result(ttft, e2el, tokens, itl=(), ok=True, status=200, prompt_tokens=10):
    return lt.RequestResult(
        ok=ok, status=status, ttft=ttft, e2el=e2el, itl=list(itl), completion_tokens=tokens,
        prompt_tokens=prompt_tokens, usage_reported=True, chunks=len(itl) + 1,
    )  # fmt: skip


def test_summarize_counts_throughput_and_latencies():
    results = [
        _result(0.1, 1.1, 11, itl=[0.2, 0.3]),  # tpot 0.1
        _result(0.3, 2.3, 5, itl=[0.5]),  # tpot 0.5
        _result(0.2, 0.2, 1),  # one token: no tpot
        _result(None, 0.01, 0, ok=False, status=429),
        _result(None, 0.01, 0, ok=False, status=429),
        _result(None, 0.5, 0, ok=False, status=500),
        _result(None, 0.5, 0, ok=False, status=None),
    ]
    m = lt.summarize(results, duration=4.0, percentiles=(50, 90))
    assert (m["completed"], m["failed"], m["rejected_429"]) == (3, 2, 2)
    assert m["failed_by_status"] == {"500": 1, "connection": 1}
    assert m["total_output_tokens"] == 17 and m["total_input_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(3 / 4.0)
    assert m["output_throughput"] == pytest.approx(17 / 4.0)
    assert m["total_token_throughput"] == pytest.approx(47 / 4.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(300.0)
    assert m["median_itl_ms"] == pytest.approx(300.0)  # ITL gaps are pooled over requests
    assert m["p50_e2el_ms"] == pytest.approx(m["median_e2el_ms"]) == pytest.approx(1100.0)
    assert m["std_ttft_ms"] == pytest.approx(statistics.pstdev([100.0, 300.0, 200.0]))
    assert "p90_tpot_ms" in m and "p99_tpot_ms" not in m


def test_summarize_empty_run_has_no_latencies():
    m = lt.summarize([], duration=0.0)
    assert m["completed"] == 0 and m["output_throughput"] == 0.0 and m["mean_ttft_ms"] is None


# ------------------------------------------------------------------ Prometheus

METRICS_BEFORE = """\
# HELP trieserve_requests_total Requests by endpoint and status.
# TYPE trieserve_requests_total counter
trieserve_requests_total{endpoint="/v1/chat/completions",status="200"} 4.0
trieserve_requests_total{endpoint="/v1/chat/completions",status="429"} 1.0
trieserve_requests_created{endpoint="/v1/chat/completions",status="200"} 1.7e+09
trieserve_generation_tokens_total 100.0
trieserve_forward_passes_total 50.0
trieserve_draft_tokens_total 400
trieserve_accepted_tokens_total 40
trieserve_kv_tokens_kept_total 900
trieserve_kv_tokens_seen_total 1000
trieserve_accepted_length_bucket{le="1.0"} 10
trieserve_accepted_length_bucket{le="+Inf"} 50
trieserve_accepted_length_sum 40
trieserve_accepted_length_count 50
trieserve_queue_length 0
odd_metric{path="a \\"quoted\\" value, with comma"} 7 1712345678000
"""
METRICS_AFTER = (
    METRICS_BEFORE.replace('status="200"} 4.0', 'status="200"} 10.0')
    .replace("trieserve_generation_tokens_total 100.0", "trieserve_generation_tokens_total 400.0")
    .replace("trieserve_forward_passes_total 50.0", "trieserve_forward_passes_total 150.0")
    .replace("trieserve_draft_tokens_total 400", "trieserve_draft_tokens_total 1400")
    .replace("trieserve_accepted_tokens_total 40", "trieserve_accepted_tokens_total 240")
    .replace("trieserve_kv_tokens_kept_total 900", "trieserve_kv_tokens_kept_total 1400")
    .replace("trieserve_kv_tokens_seen_total 1000", "trieserve_kv_tokens_seen_total 2000")
    .replace("trieserve_accepted_length_sum 40", "trieserve_accepted_length_sum 240")
    .replace("trieserve_accepted_length_count 50", "trieserve_accepted_length_count 150")
)


def test_parse_prometheus_labels_and_values():
    s = lt.parse_prometheus(METRICS_BEFORE)
    key = ("trieserve_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    assert s[key] == 4.0
    assert s[("trieserve_accepted_length_bucket", (("le", "+Inf"),))] == 50
    assert s[("odd_metric", (("path", 'a "quoted" value, with comma'),))] == 7  # timestamp ignored
    assert lt.metric_sum(s, "trieserve_requests_total") == 5.0
    assert lt.metric_sum(s, "trieserve_requests_total", status="429") == 1.0
    assert lt.metric_sum(s, "missing_total") == 0.0


def test_server_figures_diff_counters():
    before, after = lt.parse_prometheus(METRICS_BEFORE), lt.parse_prometheus(METRICS_AFTER)
    assert lt.counter_delta(before, after, "trieserve_requests_total", status="200") == 6.0
    f = lt.server_figures(before, after)
    assert f["metrics_source"] == "prometheus"
    assert f["generation_tokens"] == 300 and f["forward_passes"] == 100
    assert f["tokens_per_forward"] == pytest.approx(3.0)
    assert f["acceptance_rate"] == pytest.approx(200 / 1000)
    assert f["mean_accepted_length"] == pytest.approx(2.0)
    assert f["kv_kept_ratio"] == pytest.approx(0.5)


def test_server_figures_empty_for_other_servers():
    other = lt.parse_prometheus("vllm:num_requests_running 3\n")
    assert lt.server_figures({}, other) == {}


def test_stats_figures_from_response_stats():
    r = _result(0.1, 1.0, 12)
    r.stats = {
        "forward_passes": 4,
        "draft_tokens": 20,
        "accepted_tokens": 8,
        "kv_tokens_kept": 5,
        "kv_tokens_total": 10,
    }
    f = lt.stats_figures([r, r])
    assert f["tokens_per_forward"] == pytest.approx(3.0)
    assert f["acceptance_rate"] == pytest.approx(0.4)
    assert f["kv_kept_ratio"] == pytest.approx(0.5)
    assert f["metrics_source"] == "response_stats"


# ------------------------------------------------------------------ datasets and arrivals


@pytest.mark.parametrize("dataset", ["random", "copy", "chat"])
def test_datasets_are_deterministic_per_seed(dataset):
    a = lt.make_prompts(dataset, 12, seed=3, input_len=64)
    assert a == lt.make_prompts(dataset, 12, seed=3, input_len=64)
    assert a != lt.make_prompts(dataset, 12, seed=4, input_len=64)
    assert len(a) == 12 and all(isinstance(p, str) and p.strip() for p in a)


def test_random_prompts_have_about_input_len_words():
    for p in lt.make_prompts("random", 5, seed=0, input_len=200):
        assert 180 <= len(p.split()) <= 220


def test_copy_prompts_quote_real_source_text():
    sources = [text for _, text in lt.copy_sources()]
    assert any(kind == "code" for kind, _ in lt.copy_sources())
    prompts = lt.make_prompts("copy", 30, seed=1, input_len=128)
    kinds = set()
    for p in prompts:
        kind = "doc" if "<document>" in p else "code"
        pattern = r"<document>\n(.*)\n</document>" if kind == "doc" else r"```python\n(.*)\n```"
        m = re.search(pattern, p, re.S)
        assert m, p[:200]
        quoted = m.group(1)
        kinds.add(kind)
        assert len(quoted) >= 200
        assert any(quoted in text for text in sources), quoted[:200]
    assert "code" in kinds


def test_chat_prompts_have_nothing_to_copy():
    for p in lt.make_prompts("chat", 20, seed=0):
        assert len(p) < 200 and "```" not in p


def test_sharegpt_first_human_turn_shuffled_and_cycled(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "first question"}, {"from": "gpt", "value": "x"}]},
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "second question"},
            ]
        },
        {"conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"conversations": []},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    prompts = lt.make_prompts("sharegpt", 5, seed=0, dataset_path=str(path))
    assert len(prompts) == 5 and set(prompts) == {"first question", "second question"}
    assert prompts == lt.make_prompts("sharegpt", 5, seed=0, dataset_path=str(path))
    with pytest.raises(ValueError):
        lt.make_prompts("sharegpt", 1, seed=0)


def test_deal_gives_disjoint_hands_of_matched_length():
    pool = lt.make_prompts("copy", 10 * 40, seed=3, input_len=300)
    hands = lt.deal(pool, 10, random.Random(3))
    assert [len(h) for h in hands] == [40] * 10
    assert sorted(p for h in hands for p in h) == sorted(pool)  # every prompt dealt once
    assert hands == lt.deal(pool, 10, random.Random(3))  # seeded
    # each group of 10 length-ranked prompts sends one to each hand, so the hands' mean
    # lengths differ by less than the largest gap between neighbouring ranks would allow
    ranked = sorted(lt.rough_tokens(p) for p in pool)
    means = [statistics.mean(lt.rough_tokens(p) for p in h) for h in hands]
    group_spread = statistics.mean(ranked[g * 10 + 9] - ranked[g * 10] for g in range(40))
    assert max(means) - min(means) <= group_spread
    sliced = [statistics.mean(lt.rough_tokens(p) for p in pool[i * 40 : (i + 1) * 40]) for i in range(10)]
    assert max(means) - min(means) < max(sliced) - min(sliced)  # consecutive slices match worse


def test_rough_tokens_counts_words_and_marks():
    assert lt.rough_tokens("def f(x): return x+1") == 10
    assert lt.rough_tokens("") == 0


def test_poisson_arrivals_mean_rate():
    times = lt.arrival_times(20000, rate=5.0, rng=random.Random(0))
    assert times == sorted(times)
    assert len(times) / times[-1] == pytest.approx(5.0, rel=0.03)
    gaps = np.diff([0.0, *times])
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    assert times == lt.arrival_times(20000, rate=5.0, rng=random.Random(0))


def test_bursty_arrivals_keep_the_rate():
    times = lt.arrival_times(20000, rate=2.0, rng=random.Random(1), burstiness=0.5)
    assert len(times) / times[-1] == pytest.approx(2.0, rel=0.05)


def test_infinite_rate_sends_all_at_once():
    assert lt.arrival_times(4, rate=math.inf, rng=random.Random(0)) == [0.0] * 4
    with pytest.raises(ValueError):
        lt.arrival_times(4, rate=0.0, rng=random.Random(0))


def test_target_urls_and_body():
    t = lt.Target("http://h:1/v1/", "m", max_tokens=7, extra_body={"top_p": 0.5})
    assert t.root == "http://h:1" and t.url == "http://h:1/v1/chat/completions"
    body = t.body("hi", lookahead=None)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["top_p"] == 0.5
    assert "lookahead" not in body and t.body("hi", lookahead=False)["lookahead"] is False
    c = lt.Target("http://h:1", "m", endpoint="completions")
    assert c.url == "http://h:1/v1/completions" and c.body("hi", True)["prompt"] == "hi"


# ------------------------------------------------------------------ fake OpenAI streaming server

TOKENS_PER_CHUNK = 3


class FakeState:
    def __init__(self):
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.counters = dict.fromkeys(("generation", "forwards", "drafted", "accepted", "kept", "seen"), 0)
        self.lock = threading.Lock()

    def reset(self):
        with self.lock:
            self.bodies.clear()
            self.max_in_flight = 0


def fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        c = state.counters
        lines = [
            "# TYPE trieserve_forward_passes_total counter",
            f"trieserve_forward_passes_total {c['forwards']}",
            f"trieserve_generation_tokens_total {c['generation']}",
            f"trieserve_draft_tokens_total {c['drafted']}",
            f"trieserve_accepted_tokens_total {c['accepted']}",
            f"trieserve_kv_tokens_kept_total {c['kept']}",
            f"trieserve_kv_tokens_seen_total {c['seen']}",
            f"trieserve_accepted_length_sum {c['accepted']}",
            f"trieserve_accepted_length_count {c['forwards']}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def complete(request: Request, chat: bool):
        body = await request.json()
        state.bodies.append(body)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "REJECT" in prompt:
            return JSONResponse({"error": {"message": "queue full", "type": "overloaded"}}, 429, {"Retry-After": "1"})
        if "FAIL" in prompt:
            return JSONResponse({"error": {"message": "boom", "type": "internal"}}, 500)
        n = body["max_tokens"]
        chunks = math.ceil(n / TOKENS_PER_CHUNK)
        with state.lock:
            c = state.counters
            c["generation"] += n
            c["forwards"] += chunks
            c["drafted"] += 4 * chunks
            c["accepted"] += n - chunks
            c["kept"] += 8
            c["seen"] += 10

        def event(choices, **extra):
            kind = "chat.completion.chunk" if chat else "text_completion"
            return f"data: {json.dumps({'id': 'x', 'object': kind, 'choices': choices, **extra})}\n\n"

        def choice(text, finish=None):
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def stream():
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                if chat:  # a role-only chunk first: not a content token, must not set TTFT
                    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                if "BREAK" in prompt:  # an error after the stream has started: a final error event
                    yield f"data: {json.dumps({'error': {'message': 'engine died', 'type': 'internal'}})}\n\n"
                    return
                left = n
                for _ in range(chunks):
                    await asyncio.sleep(0.003)
                    k = min(TOKENS_PER_CHUNK, left)
                    left -= k
                    yield event([choice(" tok" * k)])
                yield event([choice("", "length")])
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
                    stats = {
                        "forward_passes": chunks,
                        "draft_tokens": 4 * chunks,
                        "accepted_tokens": n - chunks,
                    }
                    yield event([], usage=usage, stats=stats)
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


async def _run(url, point, prompts, *, endpoint="chat", max_tokens=10, lookahead=None):
    target = lt.Target(url, "fake-model", endpoint=endpoint, max_tokens=max_tokens)
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        return await lt.run_load(client, target, point, prompts, lookahead=lookahead)


def test_output_tokens_come_from_usage_not_chunks(fake_server):
    url, state = fake_server
    state.reset()
    results, duration = asyncio.run(_run(url, lt.LoadPoint(concurrency=2), ["hello"] * 6, max_tokens=10))
    assert len(results) == 6 and all(r.ok and r.status == 200 for r in results)
    assert all(r.completion_tokens == 10 and r.chunks == 4 and r.usage_reported for r in results)
    assert all(len(r.itl) == 3 and r.ttft is not None and 0 < r.ttft <= r.e2el for r in results)
    m = lt.summarize(results, duration)
    assert m["completed"] == 6 and m["total_output_tokens"] == 60
    assert m["output_throughput"] == pytest.approx(60 / duration)
    assert state.max_in_flight <= 2


def test_rejections_and_failures_are_counted_apart(fake_server):
    url, _ = fake_server
    prompts = ["ok", "REJECT me", "FAIL me", "ok", "REJECT again", "BREAK me"]
    results, duration = asyncio.run(_run(url, lt.LoadPoint(request_rate=math.inf), prompts, endpoint="completions"))
    m = lt.summarize(results, duration)
    assert (m["completed"], m["rejected_429"], m["failed"]) == (2, 2, 2)
    assert m["failed_by_status"] == {"500": 1, "stream_error": 1}


def test_open_loop_respects_concurrency_cap(fake_server):
    url, state = fake_server
    state.reset()
    results, _ = asyncio.run(_run(url, lt.LoadPoint(concurrency=3, request_rate=math.inf), ["x"] * 12))
    assert len(results) == 12 and all(r.ok for r in results)
    assert state.max_in_flight <= 3


def test_unreachable_server_is_a_connection_failure():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results, duration = asyncio.run(_run(f"http://127.0.0.1:{port}", lt.LoadPoint(), ["x"]))
    assert lt.summarize(results, duration)["failed_by_status"] == {"connection": 1}


def test_cli_compare_sweep_end_to_end(fake_server, tmp_path, capsys):
    url, state = fake_server
    state.reset()
    out = tmp_path / "result.json"
    argv = [
        "--base-url", f"{url}/v1", "--dataset", "chat", "--num-prompts", "4", "--num-warmup", "1",
        "--max-tokens", "7", "--sweep-concurrency", "1,2", "--compare", "--output-json", str(out),
        "--no-progress", "--seed", "5",
    ]  # fmt: skip
    assert lt.main(argv) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["label"], r["lookahead"]) for r in runs] == [
        ("concurrency=1", False), ("concurrency=1", True), ("concurrency=2", False), ("concurrency=2", True),
    ]  # fmt: skip
    for r in runs:
        assert r["completed"] == 4 and r["failed"] == 0 and r["total_output_tokens"] == 28
        assert r["metrics_source"] == "prometheus"
        assert r["tokens_per_forward"] == pytest.approx(7 / 3)  # warm-up requests are outside the diff
    assert result["config"]["model"] == "fake-model" and "api_key" not in result["config"]
    assert [row["label"] for row in result["comparisons"]] == ["concurrency=1", "concurrency=2"]
    assert all(row["output_throughput_ratio"] > 0 for row in result["comparisons"])
    # 4 runs x (1 warm-up + 4) requests, each with the arm's lookahead field
    flags = [b["lookahead"] for b in state.bodies]
    assert flags == ([False] * 5 + [True] * 5) * 2
    # a hand of prompts per run unless --reuse-prompts, dealt from one seeded pool by length
    sent = [b["messages"][0]["content"] for b in state.bodies]
    hands = lt.deal(lt.make_prompts("chat", 20, seed=5), 4, random.Random(5))
    for run in range(4):  # the warm-up comes first; then requests of one run arrive in any order
        assert sent[run * 5] == hands[run][0]
        assert sorted(sent[run * 5 + 1 : run * 5 + 5]) == sorted(hands[run][1:])
    assert sorted(sent) == sorted(lt.make_prompts("chat", 20, seed=5))
    printed = capsys.readouterr().out
    assert "Output token throughput (tok/s):" in printed and "out tok/s on/off" in printed


def test_cli_rounds_alternate_the_arms_and_sum_into_one_record(fake_server, tmp_path):
    url, state = fake_server
    state.reset()
    out = tmp_path / "result.json"
    argv = [
        "--base-url", f"{url}/v1", "--dataset", "chat", "--num-prompts", "6", "--num-warmup", "1",
        "--max-tokens", "7", "--concurrency", "1", "--compare", "--rounds", "3", "--output-json", str(out),
        "--no-progress",
    ]  # fmt: skip
    assert lt.main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["lookahead"] for r in runs] == [False, True]
    for r in runs:  # three rounds of two requests each, summed
        assert r["rounds"] == 3 and r["completed"] == 6 and r["total_output_tokens"] == 42
        assert r["generation_tokens"] == 42  # the server's counters summed over the rounds
        assert r["tokens_per_forward"] == pytest.approx(7 / 3)
        assert r["output_throughput"] == pytest.approx(42 / r["duration"])
    # warm-ups first (off, on), then ABBA rounds: off on | on off | off on
    flags = [b["lookahead"] for b in state.bodies]
    assert flags == [False, False, False, True, True, True, True, True, False, False, False, False, True, True]


def test_cli_plot_without_or_with_matplotlib(fake_server, tmp_path, capsys):
    url, _ = fake_server
    png = tmp_path / "sweep.png"
    argv = ["--base-url", url, "--model", "fake-model", "--num-prompts", "2", "--num-warmup", "0",
            "--max-tokens", "4", "--sweep-rate", "50,inf", "--plot", str(png), "--no-progress",
            "--metrics-url", "none"]  # fmt: skip
    assert lt.main(argv) == 0
    printed = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed and not png.exists()
    else:
        assert png.stat().st_size > 0
    assert "rate=50/s" in printed and "rate=inf/s" in printed


def test_cli_json_is_strict_with_infinite_rate(fake_server, tmp_path):
    url, _ = fake_server
    out = tmp_path / "inf.json"
    argv = ["--base-url", url, "--num-prompts", "3", "--num-warmup", "0", "--max-tokens", "2",
            "--request-rate", "inf", "--no-progress", "--output-json", str(out)]  # fmt: skip
    assert lt.main(argv) == 0

    def reject(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    result = json.loads(out.read_text(), parse_constant=reject)
    assert result["runs"][0]["request_rate"] == "inf" and result["config"]["request_rate"] == "inf"
    assert result["runs"][0]["completed"] == 3


def test_cli_rejects_bad_combinations(capsys):
    with pytest.raises(SystemExit):
        lt.main(["--sweep-concurrency", "1,2", "--sweep-rate", "1"])
    with pytest.raises(SystemExit):
        lt.main(["--dataset", "sharegpt"])
    with pytest.raises(SystemExit):
        lt.main(["--sweep-concurrency", "0,2"])
    assert "error" in capsys.readouterr().err


def test_cli_reports_unreachable_model_listing(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert lt.main(["--base-url", f"http://127.0.0.1:{port}", "--no-progress"]) == 2
    assert "pass --model" in capsys.readouterr().err
