"""What the prefix cache saves on a conversation's second turn, on the engine in-process.

    python bench/prefix_cache.py                  # 8 conversations, 64-token answers
    python bench/prefix_cache.py --conversations 4 --max-tokens 32

The multi_turn workload of bench/prompts.py: a real document with an overview question, the
model's own greedy answer, then a follow-up question. Each conversation's second turn is served
twice by one engine (built as `trieserve serve` builds it): with the prefix cache off, and with
it on after the first turn went through it (so the second turn's prompt, which starts with the
first turn's, finds those blocks). The two arms alternate which goes first. Reports per
conversation the second turn's prompt tokens, the tokens served from the cache, the time to
first token of both arms and their ratio, and checks that both arms' greedy answers are the
same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from trieserve.cache.prefix import PrefixCache
from trieserve.decoding.sampling import SamplingParams
from trieserve.server.builder import build_engine
from trieserve.server.sequence import Delta, Failure, Finish, GenerationRequest
from trieserve.server.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import build_workload  # noqa: E402


def generate(engine, ids: list[int], max_tokens: int) -> tuple[list[int], float, int]:
    """(output ids, seconds to the first token, cached prompt tokens) of one greedy request."""
    done = threading.Event()
    box: dict = {"ids": []}

    def emit(ev) -> None:
        if isinstance(ev, Delta):
            box.setdefault("first", time.perf_counter())
            box["ids"] += ev.token_ids
        elif isinstance(ev, Finish):
            box["cached"] = ev.stats["cached_prompt_tokens"]
            done.set()
        elif isinstance(ev, Failure):
            box["error"] = ev.error
            done.set()

    start = time.perf_counter()
    engine.submit(GenerationRequest(list(ids), max_tokens, SamplingParams(temperature=0.0), lookahead=False), emit)
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["ids"], box["first"] - start, box["cached"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    settings = Settings()
    engine, tokenizer = build_engine(settings)
    store = PrefixCache(settings.prefix_cache_mb * 2**20)

    def encode(messages: list[dict]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    def answer(messages: list[dict]) -> str:
        engine.prefix_cache = None
        out, _, _ = generate(engine, encode(messages), args.max_tokens)
        return tokenizer.decode(out, skip_special_tokens=True)

    convs = build_workload("multi_turn", args.conversations, args.seed, answer=answer)
    print(
        f"second turns of {len(convs)} conversations, {args.max_tokens}-token greedy answers, "
        f"threads={torch.get_num_threads()}, prefix cache {settings.prefix_cache_mb} MiB, blocks of {store.block}"
    )
    print("| conversation | prompt tokens | cached | TTFT off ms | TTFT on ms | off / on | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---|")
    ratios, same = [], 0
    for i, conv in enumerate(convs):
        first_turn, second_turn = encode(conv.messages[:1]), encode(conv.messages)
        results = {}
        for arm in ("off", "on") if i % 2 == 0 else ("on", "off"):
            if arm == "on":
                engine.prefix_cache = store
                store.clear()
                generate(engine, first_turn, 1)  # the first turn's prompt goes into the store
            else:
                engine.prefix_cache = None
            results[arm] = generate(engine, second_turn, args.max_tokens)
        (off_ids, off_s, _), (on_ids, on_s, cached) = results["off"], results["on"]
        ratios.append(off_s / on_s)
        same += off_ids == on_ids
        print(
            f"| {conv.name} | {len(second_turn)} | {cached} | {off_s * 1e3:.0f} | {on_s * 1e3:.0f} | "
            f"{off_s / on_s:.2f}x | {'yes' if off_ids == on_ids else 'NO'} |",
            flush=True,
        )
    print(f"geometric mean TTFT off / on: {statistics.geometric_mean(ratios):.2f}x; same tokens {same}/{len(convs)}")
    engine.stop()


if __name__ == "__main__":
    main()
