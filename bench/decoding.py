"""Lookahead decoding benchmark: trieserve against HF `generate`, side by side in one process.

    python bench/decoding.py                                   # all workloads, 8 prompts, 192 tokens
    python bench/decoding.py --workloads rag_qa --num-prompts 2 --max-new-tokens 64   # a smoke run
    python bench/decoding.py --output-json bench/out/decoding.json

Methods, run in this order for each prompt (prompt 1 all methods, then prompt 2, ...), so machine
noise hits every method alike:

    hf_greedy   HF `generate` greedy, a separately loaded model with default (SDPA) attention
    hf_pld      HF `generate(prompt_lookup_num_tokens=10)`, the built-in prompt-lookup peer
    hf_pld_route  the same, with the CPU few-row matmul route the trieserve engine took (kernel
                and range, server/matmul.py) switched into HF's model for the run: what the peer
                gains from that change alone. Not in the default set; ask for it with --methods.
    hf_greedy_route  HF greedy with that route (one-row forwards included where the route takes
                them): what HF's own decoding gains from the matmul kernel alone, so the rest of
                trieserve's ratio is lookahead and the engine. Not in the default set either.
    ts_greedy   trieserve engine, plain greedy (lookahead off)
    ts_cold     trieserve lookahead, the shared output trie empty (only the prompt to copy from)
    ts_warm     trieserve lookahead, the output trie first warmed with the other prompts of the
                same workload run through the engine (not measured)

The trieserve methods take the server's settings from `TRIESERVE_*` variables:
`TRIESERVE_LEAN_FORWARD=false` runs them on the transformers forward instead of the lean one
(server/lean.py), which shows what that forward contributes; the report names the forward.

Every method gets the same prompt token ids and stops on EOS or `--max-new-tokens`. Seconds are
end to end (prefill included) per request; tokens/s = sum of tokens / sum of seconds. Greedy
trieserve output must equal HF greedy's token ids on every prompt: any mismatch is printed and
the command exits 1. Workload construction lives in bench/prompts.py.

Warming, cheaply and exactly: before a workload's measured runs, each of its prompts is run once
through the engine (lookahead on, empty trie, not measured) into an output store that records
every `insert` call the engine makes. The warm trie for prompt i is a fresh store fed those
recorded calls of the other prompts, in order: the very state that running them through the
engine leaves behind (nothing is pruned at these sizes), for 1 extra run per prompt instead of
N - 1.

On a machine shared with other CPU-bound jobs, run with OMP_WAIT_POLICY=PASSIVE: with the
default spinning OpenMP workers, every forward of 2+ rows stalls for whole scheduler slices
(measured here: 2 rows 7x the cost of 1 under a load of 4 on 2 cores), which says nothing about
the methods and everything about the neighbours. The header prints the setting.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import WORKLOADS, Prompt, build_workload, encode_chat  # noqa: E402
from trieserve.decoding.sampling import SamplingParams  # noqa: E402
from trieserve.decoding.trie import OutputStore  # noqa: E402
from trieserve.server import matmul  # noqa: E402
from trieserve.server.builder import build_engine  # noqa: E402
from trieserve.server.model import resolve_model_path  # noqa: E402
from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest  # noqa: E402
from trieserve.server.settings import Settings  # noqa: E402

METHODS = ("hf_greedy", "hf_greedy_route", "hf_pld", "hf_pld_route", "ts_greedy", "ts_cold", "ts_warm")
DEFAULT_METHODS = ("hf_greedy", "hf_pld", "ts_greedy", "ts_cold", "ts_warm")
TS_METHODS = ("ts_greedy", "ts_cold", "ts_warm")
LABELS = {
    "hf_greedy": "HF greedy",
    "hf_greedy_route": "HF greedy, trieserve's matmul route",
    "hf_pld": "HF prompt lookup (10)",
    "hf_pld_route": "HF prompt lookup (10), trieserve's matmul route",
    "ts_greedy": "trieserve greedy",
    "ts_cold": "trieserve lookahead, cold trie",
    "ts_warm": "trieserve lookahead, warm trie",
}
PLD_TOKENS = 10


@dataclass
class Run:
    """One measured generation."""

    workload: str
    prompt: int
    method: str
    prompt_tokens: int
    tokens: list[int]
    seconds: float
    forwards: int  # model forward calls, prefill included
    drafted: int = 0
    accepted: int = 0
    identical: bool | None = None  # equals hf_greedy's token ids (None for hf_greedy itself)
    copy: float | None = None  # hf_greedy only: see copy_share()

    @property
    def n(self) -> int:
        return len(self.tokens)


@dataclass
class Totals:
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    mismatches: list[int] = field(default_factory=list)

    def add(self, run: Run) -> None:
        self.tokens += run.n
        self.seconds += run.seconds
        self.forwards += run.forwards
        self.drafted += run.drafted
        self.accepted += run.accepted
        if run.identical is False:
            self.mismatches.append(run.prompt)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0


# ---- the two engines ---------------------------------------------------------------------------


class HFRunner:
    """HF `generate` on its own model object; counts forward calls with a forward hook.

    Loading and every `generate` run on the thread `run_on` hands them to: the trieserve
    engine's (`Engine.call`), so one thread runs all the process's torch work. A second thread
    running torch would give OpenMP more threads than cores and slow both methods alike by
    ~1.5x (server/engine.py)."""

    def __init__(self, model_dir: Path, max_new_tokens: int, run_on: Callable = lambda fn: fn()) -> None:
        self.run_on = run_on
        self.model = run_on(lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
        self.max_new_tokens = max_new_tokens
        self.calls = 0
        self.model.register_forward_hook(self._count)

    def _count(self, *_args) -> None:
        self.calls += 1

    def generate(
        self, ids: list[int], pld: bool, max_new_tokens: int | None = None, route: matmul.Route | None = None
    ) -> tuple[list[int], float, int]:
        """Returns (new token ids, seconds, forward calls). `route`: a CPU few-row matmul
        route (`matmul.Route`) switched in for the run (and out again afterwards)."""
        return self.run_on(lambda: self._generate(ids, pld, max_new_tokens, route))

    @torch.inference_mode()
    def _generate(
        self, ids: list[int], pld: bool, max_new_tokens: int | None, route: matmul.Route | None
    ) -> tuple[list[int], float, int]:
        x = torch.tensor([ids])
        extra = {"prompt_lookup_num_tokens": PLD_TOKENS} if pld else {}
        self.calls = 0
        if route:
            matmul.install(self.model, route.max_rows, route.kernel, route.min_rows)
        try:
            start = time.perf_counter()
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens or self.max_new_tokens,
                do_sample=False,
                **extra,
            )
            seconds = time.perf_counter() - start
        finally:
            matmul.uninstall(self.model)
        return out[0, len(ids) :].tolist(), seconds, self.calls


class RecordingStore(OutputStore):
    """An output store that remembers every insert call, so the state a run leaves can be rebuilt."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[int], int]] = []

    def insert(self, tokens, new_from: int = 0) -> None:
        self.calls.append((list(tokens), new_from))  # the engine passes its live output list: copy
        super().insert(tokens, new_from)


class EngineRunner:
    """The trieserve engine, in process: submit a request, wait for its Finish event."""

    def __init__(self, settings: Settings, max_new_tokens: int) -> None:
        self.engine, self.tokenizer = build_engine(settings)
        self.runner = self.engine.runner
        self.max_new_tokens = max_new_tokens

    def generate(
        self, ids: list[int], lookahead: bool, max_new_tokens: int | None = None
    ) -> tuple[list[int], float, dict]:
        """Returns (new token ids, seconds from submit to finish, Finish.stats)."""
        done = threading.Event()
        tokens: list[int] = []
        result: list = []

        def emit(event) -> None:
            if isinstance(event, Delta):
                tokens.extend(event.token_ids)
            elif isinstance(event, (Finish, Failure)):
                result.append(event)
                done.set()

        request = GenerationRequest(
            prompt_ids=list(ids),
            max_tokens=max_new_tokens or self.max_new_tokens,
            params=SamplingParams(temperature=0.0),
            lookahead=lookahead,
        )
        start = time.perf_counter()
        seq = self.engine.submit(request, emit)
        done.wait()
        seconds = time.perf_counter() - start
        while seq in self.engine.running:  # Finish comes before the engine releases the sequence
            time.sleep(0.001)
        if isinstance(result[0], Failure):
            raise RuntimeError(f"trieserve generation failed: {result[0].error!r}") from result[0].error
        return tokens, seconds, result[0].stats

    def reset_trie(self) -> RecordingStore:
        """Replace the shared output store with an empty one (a cold trie)."""
        spec = self.engine.speculator
        spec.store = RecordingStore(capacity=spec.store.capacity, ngram_len=spec.config.ngram_len, tag=spec.store.tag)
        return spec.store

    def cost_table(self) -> str:
        cost = self.engine.speculator.cost
        if cost is None:
            return "not measured yet"
        return ", ".join(f"{n}:{s * 1e3:.1f}" for n, s in zip(cost.sizes, cost.seconds, strict=True))


# ---- the benchmark -----------------------------------------------------------------------------


def measure(
    method: str, prompt: Prompt, index: int, warm_calls: list, hf: HFRunner, ts: EngineRunner, seed: int
) -> Run:
    ids = prompt.prompt_ids
    if method == "ts_warm":
        store = ts.reset_trie()
        for tokens, new_from in warm_calls:
            store.insert(tokens, new_from)
    elif method == "ts_cold":
        ts.reset_trie()
    gc.collect()
    torch.manual_seed(seed)
    if method.startswith("hf_"):
        route = ts.runner.route if method.endswith("_route") else None
        tokens, seconds, forwards = hf.generate(ids, pld=method.startswith("hf_pld"), route=route)
        return Run(prompt.workload, index, method, len(ids), tokens, seconds, forwards)
    tokens, seconds, stats = ts.generate(ids, lookahead=method != "ts_greedy")
    return Run(
        prompt.workload,
        index,
        method,
        len(ids),
        tokens,
        seconds,
        stats["forward_passes"],
        stats["draft_tokens"],
        stats["accepted_tokens"],
    )


def warm_up(hf: HFRunner, ts: EngineRunner, ids: list[int]) -> None:
    """One short unmeasured run per method so no method pays first-call costs."""
    hf.generate(ids, pld=False, max_new_tokens=16)
    hf.generate(ids, pld=True, max_new_tokens=16)
    hf.generate(ids, pld=False, max_new_tokens=16, route=ts.runner.route)
    hf.generate(ids, pld=True, max_new_tokens=16, route=ts.runner.route)
    ts.generate(ids, lookahead=False, max_new_tokens=16)
    ts.generate(ids, lookahead=True, max_new_tokens=16)


def copy_share(prompt_ids: list[int], out: list[int], n: int = 4) -> float:
    """Share of output tokens whose n-gram (ending at that token) already occurs earlier in the
    prompt + output: a rough upper bound on what copying can draft."""
    seq = prompt_ids + out
    seen = {tuple(seq[i - n : i]) for i in range(n, len(prompt_ids) + 1)}
    hits = 0
    for i in range(len(prompt_ids), len(seq)):
        gram = tuple(seq[i - n + 1 : i + 1])
        if gram in seen:
            hits += 1
        seen.add(gram)
    return hits / len(out) if out else 0.0


def run_benchmark(args, hf: HFRunner, ts: EngineRunner, workloads: dict[str, list[Prompt]]) -> list[Run]:
    runs: list[Run] = []
    for workload, prompts in workloads.items():
        recorded = []  # per prompt: the store inserts its engine run makes (for ts_warm)
        if "ts_warm" in args.methods:
            log(f"{workload}: one unmeasured lookahead run per prompt, to warm the trie of the others")
            for prompt in prompts:
                store = ts.reset_trie()
                ts.generate(prompt.prompt_ids, lookahead=True)
                recorded.append(store.calls)
        for i, prompt in enumerate(prompts):
            warm_calls = [call for j, calls in enumerate(recorded) if j != i for call in calls]
            reference: list[int] | None = None
            for method in args.methods:
                run = measure(method, prompt, i, warm_calls, hf, ts, args.seed)
                if method == "hf_greedy":
                    reference = run.tokens
                elif reference is not None:
                    run.identical = run.tokens == reference
                    if not run.identical and method in TS_METHODS:
                        report_mismatch(run, reference, ts.tokenizer, prompt)
                runs.append(run)
                extra = f" drafted {run.drafted} accepted {run.accepted}" if method in ("ts_cold", "ts_warm") else ""
                log(
                    f"{workload} #{i} {prompt.name} [{len(prompt.prompt_ids)} tok] {method}: {run.n} tokens "
                    f"{run.seconds:.2f}s {run.n / run.seconds:.1f} tok/s {run.n / max(run.forwards, 1):.2f} tok/fwd"
                    f"{extra}{'' if run.identical is not False else '  MISMATCH'}"
                )
    return runs


def report_mismatch(run: Run, reference: list[int], tokenizer, prompt: Prompt) -> None:
    at = next(
        (k for k, (a, b) in enumerate(zip(run.tokens, reference, strict=False)) if a != b),
        min(run.n, len(reference)),
    )
    print(
        f"\n!!! TOKEN MISMATCH: {run.method} vs hf_greedy on {run.workload} #{run.prompt} ({prompt.name}) "
        f"at output position {at} (lengths {run.n} vs {len(reference)})\n"
        f"    hf_greedy: {reference[max(0, at - 5) : at + 5]} {tokenizer.decode(reference[max(0, at - 5) : at + 5])!r}\n"
        f"    {run.method}: {run.tokens[max(0, at - 5) : at + 5]} {tokenizer.decode(run.tokens[max(0, at - 5) : at + 5])!r}\n",
        file=sys.stderr,
        flush=True,
    )


# ---- report ------------------------------------------------------------------------------------


def totals(runs: list[Run], workload: str | None, method: str) -> Totals:
    t = Totals()
    for run in runs:
        if run.method == method and (workload is None or run.workload == workload):
            t.add(run)
    return t


def ratio(a: Totals, b: Totals) -> str:
    return f"{a.rate / b.rate:.2f}x" if a.tokens and b.tokens and b.rate else "-"


def method_table(runs: list[Run], workload: str | None, methods: list[str]) -> list[str]:
    hf, pld = totals(runs, workload, "hf_greedy"), totals(runs, workload, "hf_pld")
    lines = [
        "| method | tokens | seconds | tokens/s | vs HF greedy | vs HF prompt lookup | tokens/forward | drafted | accepted | identical to HF greedy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method in methods:
        t = totals(runs, workload, method)
        n_runs = sum(1 for r in runs if r.method == method and (workload is None or r.workload == workload))
        drafted = f"{t.drafted}" if method in ("ts_cold", "ts_warm") else "-"
        accepted = f"{t.accepted}" if method in ("ts_cold", "ts_warm") else "-"
        if method == "hf_greedy":
            same = "(reference)"
        elif t.mismatches:
            same = f"**NO** ({len(t.mismatches)}/{n_runs}: prompts {sorted(set(t.mismatches))})"
        else:
            same = f"yes ({n_runs}/{n_runs})"
        lines.append(
            f"| {LABELS[method]} | {t.tokens} | {t.seconds:.1f} | {t.rate:.1f} | {ratio(t, hf)} | {ratio(t, pld)} | "
            f"{t.per_forward:.2f} | {drafted} | {accepted} | {same} |"
        )
    return lines


def summary_table(runs: list[Run], workloads: list[str], methods: list[str]) -> list[str]:
    shown = [
        m for m in ("hf_greedy_route", "hf_pld", "hf_pld_route", "ts_greedy", "ts_cold", "ts_warm") if m in methods
    ]
    head = ["workload", "prompts", "tokens (HF greedy)", "HF greedy tok/s"]
    head += [f"{m} vs HF greedy" for m in shown]
    head += [f"{m} vs hf_pld" for m in ("ts_cold", "ts_warm") if m in methods]
    head += [f"{m} tok/fwd" for m in ("hf_pld", "ts_cold", "ts_warm") if m in methods]
    head += ["copyable 4-grams"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in [*workloads, None]:
        hf = totals(runs, w, "hf_greedy")
        row = [
            w or "**all**",
            str(len({(r.workload, r.prompt) for r in runs if w is None or r.workload == w})),
            str(hf.tokens),
            f"{hf.rate:.1f}",
        ]
        row += [ratio(totals(runs, w, m), hf) for m in shown]
        row += [ratio(totals(runs, w, m), totals(runs, w, "hf_pld")) for m in ("ts_cold", "ts_warm") if m in methods]
        row += [f"{totals(runs, w, m).per_forward:.2f}" for m in ("hf_pld", "ts_cold", "ts_warm") if m in methods]
        shares = [r.copy for r in runs if r.method == "hf_greedy" and (w is None or r.workload == w)]
        row += [f"{100 * sum(shares) / len(shares):.0f}%" if shares else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def target_lines(runs: list[Run], workloads: list[str]) -> list[str]:
    """The lookahead targets, checked on what was measured."""
    out = []

    def check(label: str, value: float | None, goal: float, unit: str) -> None:
        if value is None:
            return
        verdict = "met" if value >= goal else f"MISSED by {(goal - value) / goal:.0%}"
        out.append(f"- {label}: {value:.2f}{unit} (target >= {goal}{unit}): {verdict}")

    def r(w: str, a: str, b: str) -> float | None:
        ta, tb = totals(runs, w, a), totals(runs, w, b)
        return ta.rate / tb.rate if ta.tokens and tb.tokens else None

    for w in ("rag_qa", "code_edit"):
        if w not in workloads:
            continue
        for m in ("ts_warm", "ts_cold"):
            check(f"{w}, {m} vs HF greedy", r(w, m, "hf_greedy"), 2.5, "x")
            check(f"{w}, {m} vs HF prompt lookup", r(w, m, "hf_pld"), 1.25, "x")
        t = totals(runs, w, "ts_warm")
        check(f"{w}, ts_warm tokens per forward", t.per_forward if t.tokens else None, 3.0, "")
    if "open_ended" in workloads:
        for m in ("ts_cold", "ts_warm"):
            check(f"open_ended, {m} vs HF greedy", r("open_ended", m, "hf_greedy"), 0.95, "x")
    return out


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {gpu}"


def omp_policy() -> str:
    return f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (hf_greedy is always run: it is the reference)",
    )
    p.add_argument("--num-prompts", type=int, default=8, help="prompts per workload (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=192, help="new tokens per request (default 192)")
    p.add_argument(
        "--first-turn-tokens", type=int, default=96, help="length of the model's earlier answer in multi_turn"
    )
    p.add_argument("--seed", type=int, default=0, help="prompt choice and torch seed")
    p.add_argument("--output-json", type=Path, default=None, help="write every run and the tables here")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    methods = {m.strip() for m in args.methods.split(",") if m.strip()} | {"hf_greedy"}
    unknown = [w for w in args.workloads if w not in WORKLOADS] + sorted(methods - set(METHODS))
    if unknown:
        p.error(f"unknown workload or method: {', '.join(unknown)}")
    args.methods = [m for m in METHODS if m in methods]
    if args.num_prompts < 2 and "ts_warm" in args.methods:
        p.error("ts_warm needs --num-prompts >= 2 (it warms on the other prompts)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/decoding.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.now(timezone.utc)
    torch.set_grad_enabled(False)
    settings = Settings()
    if os.getloadavg()[0] > (os.cpu_count() or 1) and "OMP_WAIT_POLICY" not in os.environ:
        log("the machine is busy and OMP_WAIT_POLICY is unset: multi-row forwards will stall (see --help)")
    log(f"building the trieserve engine ({load()})")
    ts = EngineRunner(settings, args.max_new_tokens)
    cost_at_start = ts.cost_table()
    hf = HFRunner(resolve_model_path(settings.model, settings.cache_dir), args.max_new_tokens, ts.engine.call)
    tokenizer = ts.tokenizer

    def first_answer(messages: list[dict]) -> str:
        tokens, _, _ = hf.generate(encode_chat(tokenizer, messages), pld=False, max_new_tokens=args.first_turn_tokens)
        return tokenizer.decode(tokens, skip_special_tokens=True)

    workloads: dict[str, list[Prompt]] = {}
    for w in args.workloads:
        prompts = build_workload(w, args.num_prompts, args.seed, answer=first_answer)
        for p in prompts:
            p.prompt_ids = encode_chat(tokenizer, p.messages)
        workloads[w] = prompts
        log(
            f"{w}: {len(prompts)} prompts, {min(len(p.prompt_ids) for p in prompts)}-{max(len(p.prompt_ids) for p in prompts)} tokens"
        )

    warm_up(hf, ts, workloads[args.workloads[0]][0].prompt_ids)
    load_start = load()
    log(f"measuring ({load_start}); trieserve forward cost by rows (ms): {cost_at_start}")
    runs = run_benchmark(args, hf, ts, workloads)
    for r in runs:
        if r.method == "hf_greedy":
            r.copy = copy_share(workloads[r.workload][r.prompt].prompt_ids, r.tokens)
    load_end = load()
    cost_at_end = ts.cost_table()
    ts.engine.stop()
    finished = datetime.now(timezone.utc)

    lines = [
        "# trieserve decoding benchmark",
        "",
        f"- command: `{command}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, {(finished - started).total_seconds() / 60:.1f} min",
        f"- machine: {machine()}, {omp_policy()}; {load_start} at start, {load_end} at end",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- model: SmolLM2-135M-Instruct, fp32; max new tokens {args.max_new_tokens}; seed {args.seed}",
        f"- trieserve: decoding_length {settings.decoding_length}, branch_length {settings.branch_length}, "
        f"mode {settings.lookahead_mode}, max_match {settings.max_match}, "
        f"forward {'lean' if ts.engine.runner.lean is not None else 'transformers'}",
        f"- trieserve forward cost by rows (ms), start-up: {cost_at_start}",
        f"- same, after the run (online updates): {cost_at_end}",
        "",
        "## Summary (ratios of tokens/s, same prompts, same process)",
        "",
        *summary_table(runs, args.workloads, args.methods),
        "",
        "copyable 4-grams: share of HF greedy output tokens whose 4-gram already occurs earlier in prompt + output.",
        "",
    ]
    for w in args.workloads:
        lines += [f"## {w}", "", *method_table(runs, w, args.methods), ""]
    lines += ["## All workloads", "", *method_table(runs, None, args.methods), ""]
    targets = target_lines(runs, args.workloads)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    mismatched = [r for r in runs if r.method in TS_METHODS and r.identical is False]
    if mismatched:
        lines += [
            "## TOKEN MISMATCHES",
            "",
            *[f"- {r.method} on {r.workload} #{r.prompt} ({workloads[r.workload][r.prompt].name})" for r in mismatched],
            "",
        ]
    report = "\n".join(lines)
    print(report)
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command,
            "started": started.isoformat(),
            "machine": machine(),
            "load": [load_start, load_end],
            "cost_ms": [cost_at_start, cost_at_end],
            "prompts": {
                w: [{"name": p.name, "messages": p.messages, "prompt_tokens": len(p.prompt_ids)} for p in ps]
                for w, ps in workloads.items()
            },
            "runs": [asdict(r) for r in runs],
            "report": report,
        }
        args.output_json.write_text(json.dumps(payload, indent=1))
    if mismatched:
        print(f"\nFAILED: {len(mismatched)} trieserve run(s) differ from HF greedy (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
