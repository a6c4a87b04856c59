"""Closed-loop load on the engine alone, in-process: no HTTP, no tokenizer on the client side.

    python bench/engine_load.py                                  # copy, concurrency 1 and 8, lookahead off
    python bench/engine_load.py --dataset chat --conc 1,2,4,8 --lookahead off,on

Builds the engine as `trieserve serve` does (default settings: matmul route, cost ladder), then
for each concurrency and arm keeps that many requests running: each finished request is
replaced at once by the next from the run's hand of prompts (the load test's datasets and
length-matched hands, server/loadtest.py), greedy, `--max-tokens` tokens, EOS ignored. Reports
output tokens/s per run and its ratio to concurrency 1 of the same arm, prompt tokens per
request and the mean time to first token. Set against `trieserve loadtest` at the same points,
it tells how much of a throughput figure the engine sets and how much the HTTP path and the
load generator (sharing the same cores) take.
"""

from __future__ import annotations

import argparse
import queue
import random
import time

import torch
from trieserve.decoding.sampling import SamplingParams
from trieserve.server.builder import build_engine
from trieserve.server.loadtest import deal, make_prompts
from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest
from trieserve.server.settings import Settings


def run(engine, prompts: list[list[int]], conc: int, lookahead: bool, max_tokens: int) -> dict:
    """Keep `conc` requests running until `prompts` are used; returns the run's figures."""
    done: queue.Queue = queue.Queue()
    first: dict[int, float] = {}
    sent: dict[int, float] = {}
    tokens = forwards = 0

    def submit(i: int) -> None:
        def emit(ev, i=i) -> None:
            if isinstance(ev, Delta) and i not in first:
                first[i] = time.perf_counter()
            elif isinstance(ev, Finish | Failure):
                done.put((i, ev))

        sent[i] = time.perf_counter()
        request = GenerationRequest(
            list(prompts[i]), max_tokens, SamplingParams(temperature=0.0), lookahead=lookahead, ignore_eos=True
        )
        engine.submit(request, emit)

    start = time.perf_counter()
    nxt = min(conc, len(prompts))
    for i in range(nxt):
        submit(i)
    for _ in range(len(prompts)):
        i, ev = done.get()
        if isinstance(ev, Failure):
            raise ev.error
        tokens += ev.completion_tokens
        forwards += ev.stats["forward_passes"]
        if nxt < len(prompts):
            submit(nxt)
            nxt += 1
    wall = time.perf_counter() - start
    ttft = [first[i] - sent[i] for i in first]
    return {
        "tok_s": tokens / wall,
        "prompt": sum(len(p) for p in prompts) / len(prompts),
        "ttft_ms": 1e3 * sum(ttft) / len(ttft),
        "tok_fwd": tokens / forwards,
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="copy", choices=("copy", "chat"))
    ap.add_argument("--conc", default="1,8", help="concurrencies, comma-separated")
    ap.add_argument("--lookahead", default="off", help="arms: off, on or off,on")
    ap.add_argument("--n", type=int, default=24, help="requests per run")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    concs = [int(c) for c in args.conc.split(",")]
    arms = [{"off": False, "on": True}[a] for a in args.lookahead.split(",")]
    engine, tokenizer = build_engine(Settings())

    def encode(text: str) -> list[int]:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer.encode(chat, add_special_tokens=False)

    runs = len(concs) * len(arms)
    pool = make_prompts(args.dataset, (args.n + 1) * runs, seed=args.seed)
    hands = deal(pool, runs, random.Random(args.seed))
    print(
        f"engine alone, {args.dataset}, {args.n} requests of {args.max_tokens} tokens per run, threads={torch.get_num_threads()}"
    )
    print(
        "| concurrency | lookahead | prompt tokens / request | out tok/s | vs concurrency 1 | mean TTFT ms | tok/fwd |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    base: dict[bool, float] = {}
    for c_i, conc in enumerate(concs):
        for a_i, arm in enumerate(arms):
            hand = [encode(p) for p in hands[c_i * len(arms) + a_i]]
            run(engine, hand[:1], 1, arm, args.max_tokens)  # warm-up
            r = run(engine, hand[1:], conc, arm, args.max_tokens)
            base.setdefault(arm, r["tok_s"])
            print(
                f"| {conc} | {'on' if arm else 'off'} | {r['prompt']:.0f} | {r['tok_s']:.2f} | "
                f"{r['tok_s'] / base[arm]:.2f}x | {r['ttft_ms']:.0f} | {r['tok_fwd']:.2f} |",
                flush=True,
            )
    engine.stop()


if __name__ == "__main__":
    main()
