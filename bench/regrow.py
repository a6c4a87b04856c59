"""Eviction during long generations (`--kv-regrow`): quality and memory against the full cache.

    python bench/regrow.py                                  # defaults: 8 documents, ~3-5 min on 2 CPU cores
    python bench/regrow.py --samples 2 --cont 128           # a smoke run
    python bench/regrow.py --json bench/out/regrow.json

Each sample is real text that ships with Python (`pydoc_data.topics`, the language reference): a
document's first `--length` tokens as the prompt, then its true next `--cont` tokens
teacher-forced, as a long generation that copies nothing from the prompt would run. Each policy
runs at `--budget` in two modes against the full cache:

- prefill: evicted once after the prompt (the prompt run whole, one compaction), then every
  continuation token appended: the cache grows with the generation.
- regrow R: the same, and every R tokens the cache is evicted again to the budget of all tokens
  seen so far, the last `--window` of them observing (`ModelRunner.evict_again`, what the engine
  runs at each `kv_regrow` point). The continuation is fed R tokens per forward, which puts the
  same rows in the cache at each compaction as one token per step does.

Columns: top1 = share of continuation positions whose argmax equals the full cache's (all of
them, and the last quarter, where the generation has run longest); KL = mean KL(full || evicted)
per position, nats; KV end = rows held at the end (padding of per-head budgets included) / the
full cache's rows at the end; KV peak = the largest rows held during the continuation / the same.
Loss = 1 - top1 (the full cache's own top1 is 1 by definition).
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from trieserve.cache.eviction import eviction_for
from trieserve.server.model import load_model, resolve_model_path
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings

POLICIES = ("streaming", "snapkv", "defensive", "layer_defensive")
DOCS = ("datamodel", "types", "typesseq", "compound", "formatstrings", "specialnames", "execmodel", "exprlists")


def samples(tok, n: int, length: int, cont: int) -> list[tuple[str, list[int]]]:
    """n token runs of length + cont from the longest documents, two per document where they fit."""
    docs = sorted(
        ((name, tok(pydoc_data.topics.topics[name])["input_ids"]) for name in DOCS if name in pydoc_data.topics.topics),
        key=lambda d: -len(d[1]),
    )
    out, need = [], length + cont
    for offset in (0, need):
        for name, ids in docs:
            if len(ids) >= offset + need and len(out) < n:
                out.append((f"{name}@{offset}", ids[offset : offset + need]))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} runs of {need} tokens in the documents; ask for fewer or shorter")
    return out


def run(runner, ids: list[int], length: int, policy: str | None, budget: float, window: int, regrow: int):
    """Logits [cont, V] predicting each continuation token, and (rows held at the end, the peak),
    summed over layers. policy None = the full cache."""
    cache = runner.new_cache()
    eviction = eviction_for(policy, budget, window) if policy else None
    last = runner.prefill(cache, ids[:length], eviction=eviction)
    feed = ids[length:-1]  # token i predicts token i + 1; the prompt's last logits predict the first
    step = regrow if eviction is not None and regrow else len(feed)
    logits, peak = [last[None]], 0
    for lo in range(0, len(feed), step):
        chunk = feed[lo : lo + step]
        pos = length + lo
        logits.append(runner.forward(cache, torch.tensor(chunk), torch.arange(pos, pos + len(chunk))))
        peak = max(peak, sum(cache.lengths()))
        seen = pos + len(chunk)
        if eviction is not None and regrow and len(chunk) == step:
            runner.evict_again(cache, ids[seen - window : seen], seen, eviction)
    return torch.cat(logits), sum(cache.lengths()), peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=1000, help="prompt tokens")
    ap.add_argument("--cont", type=int, default=512, help="continuation tokens teacher-forced")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--regrow", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--json", help="also write every per-sample row here")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    if any(0 < r < args.window for r in args.regrow):
        raise SystemExit(f"--regrow values must be at least --window ({args.window})")
    torch.set_grad_enabled(False)
    started = time.time()
    settings = Settings()
    model, tok = load_model(resolve_model_path(settings.model, settings.cache_dir), "float32", "cpu")
    runner = ModelRunner(model, prefill_chunk=args.length)  # the prompt in one chunk: one compaction
    rows = []
    for i, (name, ids) in enumerate(samples(tok, args.samples, args.length, args.cont)):
        t0 = time.time()
        full, full_rows, _ = run(runner, ids, args.length, None, 1.0, args.window, 0)
        target = full.argmax(-1)
        tail = slice(len(target) * 3 // 4, None)
        for policy in policies:
            for regrow in [0, *args.regrow]:
                logits, held, peak = run(runner, ids, args.length, policy, args.budget, args.window, regrow)
                agree = logits.argmax(-1) == target
                kl = F.kl_div(logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean")
                rows.append(
                    {
                        "sample": name,
                        "policy": policy,
                        "regrow": regrow,
                        "top1": agree.float().mean().item(),
                        "top1_tail": agree[tail].float().mean().item(),
                        "kl": kl.item(),
                        "kv_end": held / full_rows,
                        "kv_peak": peak / full_rows,
                    }
                )
        print(f"[{i + 1}/{args.samples}] {name} {time.time() - t0:.0f}s", file=sys.stderr)
    print(f"| policy | mode | top1 | top1, last quarter | KL | loss | KV end | KV peak |\n|{'---|' * 8}")
    for policy in policies:
        for regrow in [0, *args.regrow]:
            got = [r for r in rows if r["policy"] == policy and r["regrow"] == regrow]
            mean = {k: statistics.fmean(r[k] for r in got) for k in ("top1", "top1_tail", "kl", "kv_end", "kv_peak")}
            mode = f"regrow {regrow}" if regrow else "prefill"
            print(
                f"| {policy} | {mode} | {mean['top1']:.3f} | {mean['top1_tail']:.3f} | {mean['kl']:.3f} | "
                f"{1 - mean['top1']:.1%} | {mean['kv_end']:.0%} | {mean['kv_peak']:.0%} |"
            )
    print(
        f"\n{args.samples} samples, prompt {args.length} + {args.cont} tokens, budget {args.budget:.0%}, "
        f"window {args.window}, {time.time() - started:.0f}s, torch threads {torch.get_num_threads()}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
