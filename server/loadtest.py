"""HTTP load test for any OpenAI-compatible server (trieserve, vLLM, ...): `trieserve loadtest`.

Streams chat or text completions with `stream_options.include_usage`, under an open-loop
(Poisson) or closed-loop (fixed concurrency) load, optionally swept over several load
points and compared with lookahead off and on. Metric names follow `vllm bench serve`.

Definitions (per request, then mean / median / pXX over requests):
  ttft  = first content chunk - request sent
  e2el  = stream end - request sent
  tpot  = (e2el - ttft) / (completion_tokens - 1), only requests with > 1 output token
  itl   = gaps between consecutive content chunks (one chunk may carry several tokens)
Output tokens come from `usage.completion_tokens`, never from counting chunks. When the
target is trieserve, a /metrics scrape before and after each run adds tokens per forward,
draft acceptance and KV kept/seen (falling back to the responses' `stats` objects).

Each run (sweep point, compare arm) gets its own prompts from one seeded stream unless
--reuse-prompts: the server's trie keeps what it generated, so replaying the same prompts
would let a later run draft from an earlier run's outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import functools
import importlib.metadata
import json
import math
import random
import re
import statistics
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

CHARS_PER_TOKEN = 3.6  # rough size of a BPE token in English prose and Python code

# ------------------------------------------------------------------------- datasets

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level "
    "office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education river garden light music market paper window storm bridge "
    "forest engine letter island winter summer mountain kitchen signal planet coffee"
).split()

CHAT_TEMPLATES = (
    "Write a short poem about {}.",
    "Give me three creative ideas involving {}.",
    "Explain {} to a ten-year-old.",
    "What are the pros and cons of {}?",
    "Tell me a short story that features {}.",
    "Describe a perfect day centred on {}.",
    "Why do people care about {}? Answer in a few sentences.",
    "Write a friendly email inviting a colleague to talk about {}.",
    "Suggest a weekend plan built around {}.",
    "List some surprising facts you might learn about {}.",
)
CHAT_TOPICS = (
    "the ocean", "autumn leaves", "learning to cook", "city gardens", "old maps", "rainy Mondays",
    "space travel", "a lost umbrella", "mountain trains", "street food", "public libraries",
    "night skies", "a new bicycle", "chess", "bird migration", "coffee shops", "volcanoes",
    "board games", "the first snow", "music festivals", "lighthouses", "remote work", "bees",
)
CODE_TASKS = (
    "Repeat the following Python code exactly as written, with no commentary.",
    "Rename `{old}` to `{new}` everywhere in the following Python code and output the complete updated code.",
    "Add type hints to the following Python code where they are obvious and output the whole code.",
    "Add a one-line comment above every `def` in the following Python code and output all of it.",
)
DOC_TASKS = (
    "Using only the document below, answer the question. Quote the relevant sentences verbatim.",
    "Copy the passage of the document below that answers the question, word for word.",
)


def random_prompts(n: int, input_len: int, rng: random.Random) -> list[str]:
    """`n` prompts of about `input_len` tokens: random common words (~1 token each)."""
    head = "Continue this list of words with a short story that uses them:"
    body_len = max(1, input_len - 12)
    return [f"{head} {' '.join(rng.choices(WORDS, k=body_len))}" for _ in range(n)]


def chat_prompts(n: int, rng: random.Random) -> list[str]:
    """Open-ended chat requests with nothing in the prompt to copy from."""
    return [rng.choice(CHAT_TEMPLATES).format(rng.choice(CHAT_TOPICS)) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def copy_sources() -> tuple[tuple[str, str], ...]:
    """Real text shipped with this Python: ("code", stdlib module source) and ("doc", package
    README from installed METADATA), in a stable order."""
    sources: list[tuple[str, str]] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > 4000 and "\ndef " in text:
            sources.append(("code", text))
    readmes = {}
    for dist in importlib.metadata.distributions():
        name, meta = dist.metadata["Name"], dist.read_text("METADATA")
        body = email.message_from_string(meta).get_payload() if meta else ""
        if name and isinstance(body, str) and len(body) > 3000:
            readmes[name.lower()] = body
    sources += [("doc", readmes[k]) for k in sorted(readmes)]
    if not sources:
        raise RuntimeError(f"no Python sources found under {stdlib} for the copy dataset")
    return tuple(sources)


def _excerpt(text: str, budget: int, starts: Sequence[int], rng: random.Random) -> str:
    lines = text.splitlines()
    out: list[str] = []
    size = 0
    for line in lines[rng.choice(starts) if starts else 0 :]:
        if size >= budget and out:
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out).strip("\n")


def copy_prompts(n: int, input_len: int, rng: random.Random) -> list[str]:
    """Copy-heavy requests (code editing, quoting RAG): real source text the answer repeats.

    Code is quoted inside a ```python fence, documents inside <document> tags.
    """
    sources = copy_sources()
    budget = max(200, int(input_len * CHARS_PER_TOKEN))
    prompts = []
    for _ in range(n):
        kind, text = rng.choice(sources)
        lines = text.splitlines()
        if kind == "code":
            starts = [i for i, line in enumerate(lines) if line.startswith(("def ", "class "))]
            code = _excerpt(text, budget, starts, rng)
            names = re.findall(r"\bdef (\w+)|\bclass (\w+)", code)
            old = next((a or b for a, b in names), "self")
            task = rng.choice(CODE_TASKS).format(old=old, new=f"{old}_renamed")
            prompts.append(f"{task}\n\n```python\n{code}\n```")
        else:
            starts = [i for i, line in enumerate(lines) if line.strip() and i and not lines[i - 1].strip()]
            doc = _excerpt(text, budget, starts, rng)
            terms = sorted({w for w in re.findall(r"[A-Za-z]{7,}", doc)}) or ["this"]
            question = f"What does the document say about {rng.choice(terms).lower()}?"
            prompts.append(f"{rng.choice(DOC_TASKS)}\n\n<document>\n{doc}\n</document>\n\nQuestion: {question}")
    return prompts


def sharegpt_prompts(path: str | Path, n: int, rng: random.Random) -> list[str]:
    """First human turn of each ShareGPT conversation ([{conversations: [{from, value}]}]),
    shuffled with `rng`, cycled when the file holds fewer than `n`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    pool = []
    for item in data if isinstance(data, list) else []:
        turns = item.get("conversations") or [] if isinstance(item, dict) else []
        first = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        if isinstance(first, str) and first.strip():
            pool.append(first)
    if not pool:
        raise ValueError(f"{path}: no ShareGPT conversations with a human turn found")
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def make_prompts(
    dataset: str, n: int, *, seed: int, input_len: int = 256, dataset_path: str | None = None
) -> list[str]:
    """`n` prompts from `dataset` (random, copy, chat, sharegpt); the same seed gives the same list."""
    rng = random.Random(seed)
    if dataset == "random":
        return random_prompts(n, input_len, rng)
    if dataset == "copy":
        return copy_prompts(n, input_len, rng)
    if dataset == "chat":
        return chat_prompts(n, rng)
    if dataset == "sharegpt":
        if not dataset_path:
            raise ValueError("dataset 'sharegpt' needs --dataset-path FILE.json")
        return sharegpt_prompts(dataset_path, n, rng)
    raise ValueError(f"unknown dataset {dataset!r}; choose random, copy, chat or sharegpt")


def arrival_times(n: int, rate: float, rng: random.Random, burstiness: float = 1.0) -> list[float]:
    """Send times (s from start) of `n` requests at `rate` req/s: gamma-distributed gaps with
    shape `burstiness` (1.0 = Poisson process). An infinite rate sends everything at t=0."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be > 0, got {rate} and {burstiness}")
    t, times = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        times.append(t)
    return times


# ------------------------------------------------------------------------- metrics math


@dataclass
class RequestResult:
    """What one streamed request measured. Times in seconds."""

    ok: bool = False
    status: int | None = None  # HTTP status; None when the connection itself failed
    error: str = ""
    start: float = 0.0  # send time relative to the run start
    ttft: float | None = None
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False
    stats: dict = field(default_factory=dict)  # trieserve's per-response `stats`, if any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None when empty."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def tpot(e2el: float, ttft: float | None, completion_tokens: int) -> float | None:
    """Time per output token after the first; None when it is undefined (< 2 tokens)."""
    if ttft is None or completion_tokens < 2:
        return None
    return (e2el - ttft) / (completion_tokens - 1)


def describe(name: str, seconds: Sequence[float], percentiles: Iterable[float]) -> dict[str, float | None]:
    """mean/median/std/pXX of `seconds` as `<stat>_<name>_ms` keys (vLLM's naming)."""
    ms = [s * 1000.0 for s in seconds]
    out: dict[str, float | None] = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else None,
        f"median_{name}_ms": statistics.median(ms) if ms else None,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else None,
    }
    for q in percentiles:
        out[f"p{q:g}_{name}_ms"] = percentile(ms, q)
    return out


def summarize(results: Sequence[RequestResult], duration: float, percentiles: Iterable[float] = (90, 99)) -> dict:
    """Aggregate one run: counts, throughputs (tokens from usage) and latency statistics."""
    done = [r for r in results if r.ok]
    failed = Counter(str(r.status or "connection") for r in results if not r.ok and r.status != 429)
    out_tokens = sum(r.completion_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    percentiles = tuple(percentiles)
    metrics: dict = {
        "completed": len(done),
        "failed": sum(failed.values()),
        "rejected_429": sum(1 for r in results if r.status == 429),
        "failed_by_status": dict(sorted(failed.items())),
        "requests_without_usage": sum(1 for r in done if not r.usage_reported),
        "duration": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
    }
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [t for r in done if (t := tpot(r.e2el, r.ttft, r.completion_tokens)) is not None]
    itls = [gap for r in done for gap in r.itl]
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", [r.e2el for r in done])):
        metrics.update(describe(name, values, percentiles))
    return metrics


# ------------------------------------------------------------------------- Prometheus

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_prometheus(text: str) -> Samples:
    """Prometheus text exposition -> {(name, sorted label pairs): value}."""
    samples: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted((k, v.replace('\\"', '"').replace("\\\\", "\\")) for k, v in _LABEL.findall(m[2] or "")))
        try:
            samples[(m[1], labels)] = float(m[3])
        except ValueError:
            continue
    return samples


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over all label sets that include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def counter_delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def speculation_figures(
    generation: float, forwards: float, drafted: float, accepted: float, kept: float, seen: float
) -> dict[str, float | None]:
    return {
        "generation_tokens": generation,
        "forward_passes": forwards,
        "tokens_per_forward": _ratio(generation, forwards),
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": _ratio(accepted, drafted),
        "kv_tokens_kept": kept,
        "kv_tokens_seen": seen,
        "kv_kept_ratio": _ratio(kept, seen),
    }


def server_figures(before: Samples, after: Samples) -> dict[str, float | None]:
    """trieserve's counters over one run (after - before); empty when the target is not trieserve."""
    if not any(name == "trieserve_forward_passes_total" for name, _ in after):
        return {}

    def d(name: str) -> float:
        return counter_delta(before, after, name)

    figures = speculation_figures(
        d("trieserve_generation_tokens_total"),
        d("trieserve_forward_passes_total"),
        d("trieserve_draft_tokens_total"),
        d("trieserve_accepted_tokens_total"),
        d("trieserve_kv_tokens_kept_total"),
        d("trieserve_kv_tokens_seen_total"),
    )
    figures["mean_accepted_length"] = _ratio(d("trieserve_accepted_length_sum"), d("trieserve_accepted_length_count"))
    figures["metrics_source"] = "prometheus"
    return figures


def stats_figures(results: Sequence[RequestResult]) -> dict[str, float | None]:
    """The same figures summed from the responses' `stats` objects (no /metrics needed)."""
    with_stats = [r for r in results if r.ok and r.stats]
    if not with_stats:
        return {}

    def s(key: str) -> float:
        return float(sum(r.stats.get(key) or 0 for r in with_stats))

    figures = speculation_figures(
        float(sum(r.completion_tokens for r in with_stats)), s("forward_passes"), s("draft_tokens"),
        s("accepted_tokens"), s("kv_tokens_kept"), s("kv_tokens_total"),
    )  # fmt: skip
    figures["metrics_source"] = "response_stats"
    return figures


# ------------------------------------------------------------------------- client


@dataclass
class Target:
    """Where and what to send. `lookahead` None leaves the field out of the request."""

    base_url: str
    model: str
    endpoint: str = "chat"  # chat | completions
    api_key: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)

    @property
    def root(self) -> str:
        return re.sub(r"/v1/?$", "", self.base_url.rstrip("/"))

    @property
    def url(self) -> str:
        return f"{self.root}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, prompt: str, lookahead: bool | None) -> dict:
        body: dict = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        if lookahead is not None:
            body["lookahead"] = lookahead
        return body | self.extra_body


def _chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


async def send_request(client: httpx.AsyncClient, target: Target, prompt: str, lookahead: bool | None) -> RequestResult:
    """Stream one completion and time it."""
    r = RequestResult()
    start = time.perf_counter()
    finished = False
    try:
        async with client.stream("POST", target.url, json=target.body(prompt, lookahead), headers=target.headers) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = (await resp.aread()).decode(errors="replace")[:300]
                return _close(r, start)
            last = start
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    r.error = json.dumps(chunk["error"])[:300]
                    break
                if chunk.get("usage"):
                    r.usage_reported = True
                    r.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                    r.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                if isinstance(chunk.get("stats"), dict):
                    r.stats = chunk["stats"]
                finished |= any(c.get("finish_reason") for c in chunk.get("choices") or [])
                if _chunk_text(chunk):
                    if r.ttft is None:
                        r.ttft = now - start
                    else:
                        r.itl.append(now - last)
                    last = now
                    r.chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    r.ok = finished and not r.error
    if r.ok and not r.usage_reported:
        r.completion_tokens = r.chunks  # best effort; reported as requests_without_usage
    if not r.ok and not r.error:
        r.error = "stream ended without [DONE] or finish_reason"
    return _close(r, start)


def _close(r: RequestResult, start: float) -> RequestResult:
    r.e2el = time.perf_counter() - start
    r.start = start
    return r


class _Progress:
    """tqdm on stderr when installed, else a plain line every 10%."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        self.enabled = enabled and total > 0
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="req", leave=False)
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled and (self.n == self.total or self.n % max(1, self.total // 10) == 0):
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class LoadPoint:
    """Closed loop at `concurrency` when `request_rate` is None; else open loop (Poisson),
    with `concurrency` (if set) capping requests in flight."""

    concurrency: int | None = None
    request_rate: float | None = None
    burstiness: float = 1.0

    @property
    def label(self) -> str:
        if self.request_rate is None:
            return f"concurrency={self.concurrency or 1}"
        cap = f",max_concurrency={self.concurrency}" if self.concurrency else ""
        return f"rate={self.request_rate:g}/s{cap}"


async def run_load(
    client: httpx.AsyncClient,
    target: Target,
    point: LoadPoint,
    prompts: Sequence[str],
    *,
    lookahead: bool | None = None,
    seed: int = 0,
    max_duration: float | None = None,
    progress: bool = False,
    desc: str = "",
) -> tuple[list[RequestResult], float]:
    """Send `prompts` under `point`'s load; no new request starts after `max_duration` s.
    Returns the results (start times relative to the run start) and the run's duration."""
    results: list[RequestResult] = []
    bar = _Progress(len(prompts), desc, progress)
    t0 = time.perf_counter()
    deadline = t0 + max_duration if max_duration else math.inf

    async def one(prompt: str) -> None:
        r = await send_request(client, target, prompt, lookahead)
        r.start -= t0
        results.append(r)
        bar.update()

    if point.request_rate is None:
        queue = iter(prompts)

        async def worker() -> None:
            for prompt in queue:  # one shared iterator: each prompt goes to exactly one worker
                if time.perf_counter() >= deadline:
                    break
                await one(prompt)

        await asyncio.gather(*(worker() for _ in range(point.concurrency or 1)))
    else:
        cap = asyncio.Semaphore(point.concurrency) if point.concurrency else None

        async def capped(prompt: str) -> None:
            if cap is None:
                return await one(prompt)
            async with cap:
                await one(prompt)

        tasks = []
        times = arrival_times(len(prompts), point.request_rate, random.Random(seed), point.burstiness)
        for at, prompt in zip(times, prompts):
            if t0 + at >= deadline:
                break
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(capped(prompt)))
        await asyncio.gather(*tasks)
    bar.close()
    return results, time.perf_counter() - t0


async def scrape(client: httpx.AsyncClient, url: str | None) -> Samples:
    if not url:
        return {}
    try:
        resp = await client.get(url)
    except httpx.HTTPError:
        return {}
    return parse_prometheus(resp.text) if resp.status_code == 200 else {}
