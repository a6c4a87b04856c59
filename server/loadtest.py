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

With --rounds N, the arms of each point alternate in N rounds (off, on, on, off, ...) and
each arm's rounds add up to its record: on a shared machine whose speed drifts over minutes,
a comparison then does not depend on which arm happened to run in the faster minutes.

Each run (sweep point and compare arm) gets its own prompts unless --reuse-prompts: the
server's trie keeps what it generated, so replaying the same prompts would let a later run
draft from an earlier run's outputs. The runs' prompts are dealt from one seeded pool by
length (`deal`), so no run gets longer prompts, and a costlier prefill, than another.
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
from collections.abc import Callable, Iterable, Sequence
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
    "the ocean|autumn leaves|learning to cook|city gardens|old maps|rainy Mondays|space travel|a lost umbrella|"
    "mountain trains|street food|public libraries|night skies|a new bicycle|chess|bird migration|coffee shops|"
    "volcanoes|board games|the first snow|music festivals|lighthouses|remote work|bees"
).split("|")
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
    """`n` prompts from `dataset` (random, copy, chat, sharegpt); the same seed gives the same list
    (for `copy`, on the same Python installation: its text comes from the installed files)."""
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


def _failure_kind(r: RequestResult) -> str:
    if r.status is None:
        return "connection"
    return "stream_error" if r.status == 200 else str(r.status)  # an error event after the stream began


def summarize(results: Sequence[RequestResult], duration: float, percentiles: Iterable[float] = (90, 99)) -> dict:
    """Aggregate one run: counts, throughputs (tokens from usage) and latency statistics."""
    done = [r for r in results if r.ok]
    failed = Counter(_failure_kind(r) for r in results if not r.ok and r.status != 429)
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
        float(sum(r.completion_tokens for r in with_stats)),
        s("forward_passes"),
        s("draft_tokens"),
        s("accepted_tokens"),
        s("kv_tokens_kept"),
        s("kv_tokens_total"),
    )
    figures["metrics_source"] = "response_stats"
    return figures


# ------------------------------------------------------------------------- client


@dataclass
class Target:
    """Where and what to send; `body()` builds one streaming request."""

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
        async with client.stream(
            "POST", target.url, json=target.body(prompt, lookahead), headers=target.headers
        ) as resp:
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
        for at, prompt in zip(times, prompts, strict=True):
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


# ------------------------------------------------------------------------- runs


@dataclass
class Plan:
    """Everything about a benchmark except the target: load points, arms, prompts, reporting."""

    points: list[LoadPoint]
    arms: list[bool | None]  # the `lookahead` field per arm: [None], [True], or [False, True] to compare
    dataset: str = "random"
    num_prompts: int = 100
    num_warmup: int = 2
    input_len: int = 256
    dataset_path: str | None = None
    seed: int = 0
    reuse_prompts: bool = False
    max_duration: float | None = None
    rounds: int = 1  # arms alternate in this many rounds per load point (see run_plan)
    metrics_url: str | None = None
    percentiles: tuple[float, ...] = (90, 99)
    progress: bool = True
    save_detailed: bool = False


def rough_tokens(text: str) -> int:
    """A tokenizer-free stand-in for a prompt's token count: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def deal(pool: Sequence[str], hands: int, rng: random.Random) -> list[list[str]]:
    """Deal `pool` into `hands` disjoint hands of equal size and matched prompt lengths: the
    prompts, ranked by `rough_tokens`, go out in groups of `hands`, one to each hand in a random
    order, and each hand is then shuffled. Runs that compare arms or concurrencies then differ
    in their prompts (no run drafts from another's outputs) but not in how long they are."""
    size = len(pool) // hands
    ranked = sorted(range(len(pool)), key=lambda i: (rough_tokens(pool[i]), i))
    dealt: list[list[str]] = [[] for _ in range(hands)]
    for g in range(size):
        group = ranked[g * hands : (g + 1) * hands]
        rng.shuffle(group)
        for out, i in zip(dealt, group, strict=True):
            out.append(pool[i])
    for out in dealt:
        rng.shuffle(out)
    return dealt


async def run_plan(client: httpx.AsyncClient, target: Target, plan: Plan, report: bool = True) -> list[dict]:
    """Run every load point with every arm, one record per (point, arm). With `rounds` > 1 the
    arms of a point alternate in rounds (ABBA order: off, on, on, off, ...), each round with its
    share of the prompts and of `max_duration`, and each arm's rounds are summed into its
    record, so a machine that speeds up or slows down during the run biases no arm. The
    warm-up runs once per point and arm, before the first round. Each (point, arm) run draws
    its warm-up and rounds from its own hand of length-matched prompts (see `deal`)."""
    rounds = max(1, plan.rounds)
    per_round = math.ceil(plan.num_prompts / rounds)
    n_runs = len(plan.points) * len(plan.arms)
    hand = plan.num_warmup + per_round * rounds
    pool = make_prompts(
        plan.dataset,
        hand * (1 if plan.reuse_prompts else n_runs),
        seed=plan.seed,
        input_len=plan.input_len,
        dataset_path=plan.dataset_path,
    )
    hands = [pool] * n_runs if plan.reuse_prompts else deal(pool, n_runs, random.Random(plan.seed))
    used = [0] * n_runs

    def take(run: int, n: int) -> list[str]:
        out = hands[run][used[run] : used[run] + n]
        used[run] += n
        return out

    records = []
    for p, point in enumerate(plan.points):
        runs: dict[bool | None, dict] = {arm: {"results": [], "duration": 0.0, "counters": {}} for arm in plan.arms}
        for r in range(rounds):
            for arm in plan.arms if r % 2 == 0 else plan.arms[::-1]:
                run_index = p * len(plan.arms) + plan.arms.index(arm)
                desc = _run_label(point, arm)
                if rounds > 1:
                    desc += f" round {r + 1}/{rounds}"
                if r == 0 and plan.num_warmup:
                    warmup = LoadPoint(concurrency=point.concurrency or 1)
                    await run_load(client, target, warmup, take(run_index, plan.num_warmup), lookahead=arm)
                measured = take(run_index, per_round)[: max(0, plan.num_prompts - r * per_round)]
                before = await scrape(client, plan.metrics_url)
                results, duration = await run_load(
                    client,
                    target,
                    point,
                    measured,
                    lookahead=arm,
                    seed=plan.seed + r,
                    max_duration=None if plan.max_duration is None else plan.max_duration / rounds,
                    progress=plan.progress,
                    desc=desc,
                )
                after = await scrape(client, plan.metrics_url)
                run = runs[arm]
                run["results"] += results
                run["duration"] += duration
                for key, value in after.items():
                    run["counters"][key] = run["counters"].get(key, 0.0) + value - before.get(key, 0.0)
        for arm in plan.arms:
            run = runs[arm]
            record = {
                "label": point.label,
                "concurrency": point.concurrency,
                "request_rate": point.request_rate,
                "burstiness": point.burstiness,
                "lookahead": arm,
                "rounds": rounds,
                **summarize(run["results"], run["duration"], plan.percentiles),
            }
            record.update(server_figures({}, run["counters"]) or stats_figures(run["results"]))
            if plan.save_detailed:
                record["requests"] = [asdict(x) for x in run["results"]]
            records.append(record)
            if report:
                print(format_run(record, plan.percentiles, title=_run_label(point, arm)), flush=True)
    return records


def _run_label(point: LoadPoint, arm: bool | None) -> str:
    return point.label + ("" if arm is None else f" lookahead={'on' if arm else 'off'}")


COMPARED = (
    "output_throughput request_throughput mean_ttft_ms median_ttft_ms mean_tpot_ms median_tpot_ms "
    "median_itl_ms mean_e2el_ms median_e2el_ms p99_e2el_ms"
).split()


def compare_records(records: Sequence[dict]) -> list[dict]:
    """Per load point: lookahead on / off for throughput (>1 is faster) and latencies (<1 is faster)."""
    rows = []
    by_label: dict[str, dict] = {}
    for rec in records:
        by_label.setdefault(rec["label"], {})[rec["lookahead"]] = rec
    for label, arms in by_label.items():
        off, on = arms.get(False), arms.get(True)
        if off is None or on is None:
            continue
        row: dict = {"label": label}
        for key in COMPARED:
            a, b = off.get(key), on.get(key)
            row[f"{key}_ratio"] = b / a if a and b is not None else None
        row["tokens_per_forward_off"] = off.get("tokens_per_forward")
        row["tokens_per_forward_on"] = on.get("tokens_per_forward")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------- report


def _json_safe(obj: object) -> object:
    """Strict JSON has no Infinity/NaN: an infinite request rate is written as "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_run(rec: dict, percentiles: Iterable[float] = (90, 99), title: str = "") -> str:
    """vLLM-style result block for one run."""
    rows = [
        ("Successful requests:", rec["completed"]),
        ("Failed requests:", rec["failed"]),
        ("Rejected (429) requests:", rec["rejected_429"]),
        ("Benchmark duration (s):", rec["duration"]),
        ("Total input tokens:", rec["total_input_tokens"]),
        ("Total generated tokens:", rec["total_output_tokens"]),
        ("Request throughput (req/s):", rec["request_throughput"]),
        ("Output token throughput (tok/s):", rec["output_throughput"]),
        ("Total token throughput (tok/s):", rec["total_token_throughput"]),
    ]
    if rec["failed_by_status"]:
        rows.insert(2, ("Failures by status:", json.dumps(rec["failed_by_status"])))
    if rec["requests_without_usage"]:
        rows.append(("Requests without usage (chunks counted):", rec["requests_without_usage"]))
    lines = [f"{' ' + (title or rec['label']) + ' ':=^64}"] + [f"{k:<44}{_fmt(v):>20}" for k, v in rows]
    for name, long in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st)"),
        ("itl", "Inter-chunk Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append(f"{' ' + long + ' ':-^64}")
        stats = [("Mean", f"mean_{name}_ms"), ("Median", f"median_{name}_ms")]
        stats += [(f"P{q:g}", f"p{q:g}_{name}_ms") for q in percentiles]
        lines += [f"{f'{label} {name.upper()} (ms):':<44}{_fmt(rec.get(key)):>20}" for label, key in stats]
    if rec.get("metrics_source"):
        lines.append(f"{' Speculation (' + rec['metrics_source'] + ') ':-^64}")
        for label, key in (
            ("Tokens per forward pass:", "tokens_per_forward"),
            ("Draft acceptance rate:", "acceptance_rate"),
            ("Mean accepted length per step:", "mean_accepted_length"),
            ("KV entries kept / seen:", "kv_kept_ratio"),
        ):
            lines.append(f"{label:<44}{_fmt(rec.get(key), 3):>20}")
    lines.append("=" * 64)
    return "\n".join(lines)


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [list(header)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


SWEEP_COLUMNS = (
    ("ok", "completed"), ("fail", "failed"), ("429", "rejected_429"), ("req/s", "request_throughput"),
    ("out tok/s", "output_throughput"), ("TTFT p50", "median_ttft_ms"), ("TPOT p50", "median_tpot_ms"),
    ("ITL p50", "median_itl_ms"), ("E2E p50", "median_e2el_ms"), ("tok/fwd", "tokens_per_forward"),
    ("accept", "acceptance_rate"),
)  # fmt: skip
COMPARE_COLUMNS = (
    ("out tok/s on/off", "output_throughput_ratio"), ("TTFT p50 on/off", "median_ttft_ms_ratio"),
    ("TPOT p50 on/off", "median_tpot_ms_ratio"), ("E2E p50 on/off", "median_e2el_ms_ratio"),
    ("tok/fwd off", "tokens_per_forward_off"), ("tok/fwd on", "tokens_per_forward_on"),
)  # fmt: skip


def format_sweep(records: Sequence[dict]) -> str:
    arm = {None: "-", True: "on", False: "off"}
    rows = [(r["label"], arm[r["lookahead"]], *(r.get(key) for _, key in SWEEP_COLUMNS)) for r in records]
    return format_table(("load", "lookahead", *(h for h, _ in SWEEP_COLUMNS)), rows)


def format_compare(rows: Sequence[dict]) -> str:
    table = [(r["label"], *(r.get(key) for _, key in COMPARE_COLUMNS)) for r in rows]
    return format_table(("load", *(h for h, _ in COMPARE_COLUMNS)), table)


def plot_records(records: Sequence[dict], path: str) -> str:
    """Throughput and median latencies against load, one line per arm; returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written"
    labels = list(dict.fromkeys(r["label"] for r in records))
    panels = (
        ("output_throughput", "output tokens/s"),
        ("median_ttft_ms", "median TTFT (ms)"),
        ("median_tpot_ms", "median TPOT (ms)"),
        ("median_e2el_ms", "median end-to-end latency (ms)"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for arm in dict.fromkeys(r["lookahead"] for r in records):
            rows = {r["label"]: r.get(key) for r in records if r["lookahead"] == arm}
            ys = [rows.get(label) for label in labels]
            name = "all" if arm is None else f"lookahead {'on' if arm else 'off'}"
            ax.plot(range(len(labels)), [math.nan if y is None else y for y in ys], marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ------------------------------------------------------------------------- CLI


def _list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from e
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive values, got {text!r}")
        return values

    return parse


EXAMPLES = """examples:
  trieserve loadtest --dataset copy --num-prompts 50 --concurrency 2
  trieserve loadtest --dataset chat --sweep-concurrency 1,2,4,8 --compare --output-json out.json --plot out.png
  trieserve loadtest --base-url http://gpu-box:8000/v1 --request-rate 2 --max-duration 120
  python bench/loadtest.py --dataset sharegpt --dataset-path ShareGPT_V3.json --sweep-rate 0.5,1,2
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trieserve loadtest",
        description="Load-test an OpenAI-compatible server with streaming requests (vLLM bench serve metrics).",
        epilog=EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is fine)")
    g.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="/v1/chat/completions or /v1/completions",
    )
    g.add_argument("--model", help="model id; unset = the first of GET /v1/models")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--metrics-url", help="Prometheus endpoint to diff; unset = BASE/metrics, 'none' = skip")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--wait-ready", type=float, default=0.0, help="first wait up to this long for /health 200")
    g = p.add_argument_group("requests")
    g.add_argument("--dataset", choices=("random", "copy", "chat", "sharegpt"), default="random", help="prompt source")
    g.add_argument("--dataset-path", help="ShareGPT JSON file for --dataset sharegpt")
    g.add_argument("--input-len", type=int, default=256, help="approximate prompt tokens (random, copy)")
    g.add_argument("--max-tokens", type=int, default=128, help="output length limit per request")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true (vLLM extension)")
    g.add_argument("--lookahead", choices=("on", "off"), help="send the trieserve `lookahead` field")
    g.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every request")
    g.add_argument("--num-prompts", type=int, default=100, help="measured requests per run")
    g.add_argument("--num-warmup", type=int, default=2, help="unmeasured requests before each run")
    g.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    g.add_argument(
        "--reuse-prompts",
        action="store_true",
        help="send the same prompts in every run (else each run gets fresh ones)",
    )
    g = p.add_argument_group("load (default: closed loop, concurrency 1)")
    g.add_argument(
        "--request-rate",
        type=float,
        help="open loop: Poisson arrivals at this rate (req/s); inf = all at once",
    )
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    g.add_argument("--concurrency", type=int, help="closed loop with N in flight; with a rate, the in-flight cap")
    g.add_argument("--sweep-concurrency", type=_list(int), help="closed-loop points, e.g. 1,2,4,8")
    g.add_argument("--sweep-rate", type=_list(float), help="open-loop points in req/s, e.g. 0.5,1,2")
    g.add_argument("--max-duration", type=float, help="stop sending new requests after this many seconds per run")
    g.add_argument("--compare", action="store_true", help="run every point with lookahead off, then on")
    g.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split each point's prompts (and --max-duration) into N rounds in which the arms "
        "alternate (off, on, on, off, ...), so drift in machine speed biases neither arm",
    )
    g = p.add_argument_group("output")
    g.add_argument("--percentiles", type=_list(float), default=[90.0, 99.0], help="e.g. 50,90,99")
    g.add_argument("--output-json", help="write config, every run and comparisons to this file")
    g.add_argument("--save-detailed", action="store_true", help="include per-request timings in the JSON")
    g.add_argument("--plot", help="PNG of throughput and latency against load (needs matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def plan_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    if args.sweep_concurrency and args.sweep_rate:
        parser.error("use one of --sweep-concurrency and --sweep-rate")
    if args.sweep_concurrency and args.request_rate is not None:
        parser.error("--sweep-concurrency is closed loop; drop --request-rate (or use --sweep-rate)")
    if args.compare and args.lookahead:
        parser.error("--compare sets the lookahead field itself; drop --lookahead")
    for name in ("num_prompts", "input_len", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    widest = max(args.sweep_concurrency or [args.concurrency or 1])
    if args.rounds > 1 and math.ceil(args.num_prompts / args.rounds) < 2 * widest:
        print(
            f"warning: {math.ceil(args.num_prompts / args.rounds)} prompts per round cannot keep "
            f"concurrency {widest} busy for more than one wave; raise --num-prompts or lower --rounds",
            file=sys.stderr,
        )
    if args.num_warmup < 0 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--num-warmup must be >= 0 and --concurrency >= 1")
    if args.request_rate is not None and not args.request_rate > 0:
        parser.error("--request-rate must be > 0 (inf for all at once)")
    if args.dataset == "sharegpt" and not args.dataset_path:
        parser.error("--dataset sharegpt needs --dataset-path")
    if not isinstance(args.extra_body, dict):
        parser.error("--extra-body must be a JSON object")
    if args.sweep_concurrency:
        points = [LoadPoint(concurrency=c) for c in args.sweep_concurrency]
    elif args.sweep_rate:
        points = [LoadPoint(args.concurrency, rate, args.burstiness) for rate in args.sweep_rate]
    elif args.request_rate is not None:
        points = [LoadPoint(args.concurrency, args.request_rate, args.burstiness)]
    else:
        points = [LoadPoint(concurrency=args.concurrency or 1)]
    arms = [False, True] if args.compare else [None if args.lookahead is None else args.lookahead == "on"]
    root = re.sub(r"/v1/?$", "", args.base_url.rstrip("/"))
    metrics_url = None if args.metrics_url == "none" else args.metrics_url or f"{root}/metrics"
    fields = ("dataset", "num_prompts", "num_warmup", "input_len", "dataset_path", "seed", "reuse_prompts")
    return Plan(
        points,
        arms,
        max_duration=args.max_duration,
        metrics_url=metrics_url,
        percentiles=tuple(args.percentiles),
        progress=not args.no_progress,
        save_detailed=args.save_detailed,
        rounds=args.rounds,
        **{k: getattr(args, k) for k in fields},
    )


async def wait_ready(client: httpx.AsyncClient, root: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await client.get(f"{root}/health")).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.5)


async def first_model(client: httpx.AsyncClient, root: str, headers: dict[str, str]) -> str:
    resp = await client.get(f"{root}/v1/models", headers=headers)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def _run(args: argparse.Namespace, plan: Plan) -> int:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        fields = ("base_url", "endpoint", "api_key", "max_tokens", "temperature", "ignore_eos", "extra_body")
        target = Target(model=args.model or "", **{k: getattr(args, k) for k in fields})
        if args.wait_ready and not await wait_ready(client, target.root, args.wait_ready):
            print(f"error: {target.root}/health was not 200 within {args.wait_ready:g} s", file=sys.stderr)
            return 2
        if not target.model:
            try:
                target.model = await first_model(client, target.root, target.headers)
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                print(
                    f"error: cannot list models at {target.root}/v1/models ({e}); pass --model",
                    file=sys.stderr,
                )
                return 2
        records = await run_plan(client, target, plan)
    comparisons = compare_records(records)
    if len(records) > 1:
        print(format_sweep(records))
    if comparisons:
        print("\nlookahead on / off (throughput > 1 and latency < 1 mean lookahead is faster)")
        print(format_compare(comparisons))
    if args.output_json:
        config = {k: v for k, v in vars(args).items() if k != "api_key"} | {"model": target.model}
        out = {"config": config, "runs": records, "comparisons": comparisons}
        Path(args.output_json).write_text(json.dumps(_json_safe(out), indent=2, default=str))
        print(f"results written to {args.output_json}")
    if args.plot:
        print(plot_records(records, args.plot))
    return 0 if any(r["completed"] for r in records) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `trieserve loadtest` and bench/loadtest.py; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    plan = plan_from_args(args, parser)
    try:
        return asyncio.run(_run(args, plan))
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:  # unreadable dataset file, bad JSON, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
