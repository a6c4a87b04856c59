"""Soak: a few hundred mixed requests at concurrency 8 against the live server.

Valid requests (streaming or not) must return exactly the greedy text they get when served
alone; cancelled streams must free their sequences; invalid requests must get their 4xx; and
the server process's memory after the run must stay within a small margin of its memory after
warm-up (caches, queues and the trie store are bounded)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx

from tests.conftest import metric

MAX_TOKENS = 4
CONCURRENCY = 8
REQUESTS = 240
RSS_MARGIN_MIB = 64  # allocator noise on a ~1 GiB process; a leak of one KV cache per request is far more

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Here is a list of fruits: apple, banana,",
    "To make a cup of tea, first",
    "The quick brown fox",
    "SELECT name FROM users WHERE",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
CHATS = [
    [{"role": "user", "content": "Name a planet."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Say hello in Spanish."}],
    [{"role": "user", "content": "Give me a color."}],
]
INVALID = [  # body, expected status
    ({"prompt": "", "max_tokens": 4}, 400),
    ({"prompt": "hi", "max_tokens": -1}, 400),
    ({"prompt": "hi", "max_tokens": 4, "temperature": "hot"}, 400),
    ({"prompt": [10**9], "max_tokens": 4}, 400),
    ({"prompt": "hi", "max_tokens": 4, "model": "no-such-model"}, 404),
    ({"messages": [], "max_tokens": 4}, 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"prompt": "hi", "stop": ["x"] * 100}, 400),
]


def valid_requests() -> list[tuple[str, dict]]:
    out = [("/v1/completions", {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}) for p in PROMPTS]
    out += [("/v1/chat/completions", {"messages": m, "max_tokens": MAX_TOKENS, "temperature": 0}) for m in CHATS]
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def text_of(path: str, body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


async def plain(c: httpx.AsyncClient, path: str, body: dict) -> tuple[int, str | None]:
    r = await c.post(path, json=body)
    return r.status_code, text_of(path, r.json()) if r.status_code == 200 else None


async def streamed(
    c: httpx.AsyncClient, path: str, body: dict, cancel_after: int | None = None
) -> tuple[int, str | None]:
    parts, finish = [], None
    async with c.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, None
        n = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            n += 1
            if cancel_after is not None and n >= cancel_after:
                return 499, None  # leave mid-stream: closing the response drops the connection
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            parts.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
            finish = choice["finish_reason"] or finish
    assert finish in ("stop", "length")
    return 200, "".join(parts)


def wait_idle(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, "trieserve_running_requests") == 0 and metric(url, "trieserve_queue_length") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the server did not go idle: cancelled sequences were not freed")


async def run_mixed(url: str, plan: list[tuple[str, str, dict, int | None]]) -> list[tuple[int, str | None]]:
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:

        async def one(kind, path, body, expect):
            async with gate:
                if kind == "plain":
                    return await plain(c, path, body)
                if kind == "stream":
                    return await streamed(c, path, body)
                if kind == "cancel":
                    return await streamed(c, path, {**body, "max_tokens": 200, "ignore_eos": True}, cancel_after=2)
                r = await c.post(path, json=body)
                assert r.json()["error"]["message"], r.text  # OpenAI-shaped
                return r.status_code, None

        return await asyncio.gather(*(one(*item) for item in plan))


def test_soak_mixed_traffic(server):
    url = server.url
    pid = server.proc.pid
    valid = valid_requests()
    # served alone, one at a time: the reference texts (and the first warm-up)
    with httpx.Client(base_url=url, timeout=120) as c:
        alone = {}
        for path, body in valid:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            alone[json.dumps(body, sort_keys=True)] = text_of(path, r.json())

    rng = random.Random(7)

    def make_plan(n: int) -> list[tuple[str, str, dict, int | None]]:
        plan = []
        for _ in range(n):
            kind = rng.choices(["plain", "stream", "cancel", "invalid"], weights=[40, 30, 15, 15])[0]
            if kind == "invalid":
                body, status = rng.choice(INVALID)
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                plan.append((kind, path, body, status))
            else:
                path, body = rng.choice(valid)
                plan.append((kind, path, body, None))
        return plan

    # warm-up at full concurrency, so every batch shape has been allocated once
    asyncio.run(run_mixed(url, make_plan(32)))
    wait_idle(url)
    warm = rss_mib(pid)

    plan = make_plan(REQUESTS)
    start = time.monotonic()
    results = asyncio.run(run_mixed(url, plan))
    elapsed = time.monotonic() - start
    wait_idle(url)
    after = rss_mib(pid)

    counts = {}
    for (kind, _path, body, expect), (status, text) in zip(plan, results, strict=True):
        counts[kind] = counts.get(kind, 0) + 1
        if kind in ("plain", "stream"):
            assert status == 200, (kind, body, status)
            assert text == alone[json.dumps(body, sort_keys=True)], (kind, body, text)
        elif kind == "cancel":
            assert status == 499
        else:
            assert status == expect, (body, status)
    assert min(counts.values()) >= 20, counts
    # still healthy and serving
    assert httpx.get(url + "/health").status_code == 200
    path, body = valid[0]
    assert (
        text_of(path, httpx.post(url + path, json=body, timeout=60).json()) == alone[json.dumps(body, sort_keys=True)]
    )
    print(f"soak: {len(plan)} requests {counts} in {elapsed:.1f}s; RSS warm {warm:.0f} MiB, after {after:.0f} MiB")
    assert after - warm < RSS_MARGIN_MIB, (warm, after)
