"""Eviction quality: every KV policy at several budgets against the full cache, on the real model.

    python bench/eviction.py                       # defaults: budgets 10/20/40%, ~10-15 min on 2 CPU cores
    python bench/eviction.py --threads 1 --json results.json
    python bench/eviction.py --passkey 2 --kv 2 --qa 2 --fidelity 1 --chunked-samples 1   # a smoke run
    python bench/eviction.py --from-json results.json --bootstrap 2000   # intervals of a saved run

Tasks, all on real text that ships with Python (`pydoc_data.topics`, the language reference):

- passkey: "The pass key is NNNNN" hidden at depth 10/50/90% of a ~1k-token document; the prompt
  ends "The pass key is". The key's tokens (a space and one token per digit) are teacher-forced:
  score = share of them that are each position's argmax (per-digit retrieval); em = all of them,
  i.e. greedy decoding would emit the whole key (exact match, reported beside the loss).
- kv: four "<name>'s locker number is NNNN." lines spread through a ~1k-token document; asked
  for one of them. Scored the same way.
- qa: a question about a ~1k-token section of the language reference, answered from it: the
  prompt ends with the answer's first words, the section's own wording of the rest (line breaks
  included) is teacher-forced, scored the same way (eviction_tasks.QUESTIONS: nine questions over three
  sections, answers from 20 % to 79 % of the way through them).
- top1 / greedy / kl (fidelity): a document's first ~1k tokens, then its true next 32 tokens
  teacher-forced: top1 = share of positions whose argmax equals the full cache's; kl = mean
  KL(full || evicted) in nats (reported, not in the loss); greedy = length of the prefix of the
  full cache's own 24-token greedy continuation that the evicted cache reproduces, / 24.

Quality loss = 1 - score / full-cache score per task; "overall" is the mean over passkey, kv,
qa, top1 and greedy. KV kept = real cached entries after prefill / prompt rows (window included);
KV memory = rows the cache holds / prompt rows, which under per-head budgets (adakv, defensive,
layer_defensive) includes the padding of heads that keep fewer rows than their layer's largest.

One-shot rows score each prompt once with the full cache, then compact a copy per policy and
budget with the final observation window (trieserve.cache.eviction.compress, the runner's own
final step): the published methods' setting. Chunked rows run the runner's evicting prefill
(`--chunk` tokens per chunk, compressing whenever a layer exceeds its budget, the last chunk with
the prompt's window) and report its peak KV bytes against the full prompt's.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from eviction_tasks import Sample, make_samples  # bench/, the script's own directory
from trieserve.cache.eviction import Eviction, PrefillTrace, WindowCapture, compress
from trieserve.cache.policies import make_policy
from trieserve.server.model import load_model, resolve_model_path
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings

POLICIES = ("streaming", "snapkv", "adakv", "defensive", "layer_defensive")
TASKS = ("passkey", "kv", "qa", "top1", "greedy")
GREEDY = 24  # fidelity: tokens of the full cache's own greedy continuation


def continue_with(runner, cache, tokens: list[int], pos: int) -> torch.Tensor:
    """Logits [T, V] of `tokens` at logical positions pos.., then the cache is rewound."""
    logits = runner.forward(cache, torch.tensor(tokens), torch.arange(pos, pos + len(tokens)))
    cache.truncate_new(len(tokens), 0)
    return logits


def score(runner, cache, sample: Sample, last: torch.Tensor, ref: dict) -> dict[str, float]:
    """Task metrics of one (possibly evicted) cache; `last` = logits after the prompt."""
    n = len(sample.ids)
    if sample.task in ("passkey", "kv", "qa"):
        rest = continue_with(runner, cache, sample.answer[:-1], n) if len(sample.answer) > 1 else last[:0]
        preds = torch.cat([last[None], rest]).argmax(-1).tolist()
        hits = [p == a for p, a in zip(preds, sample.answer, strict=True)]
        return {sample.task: sum(hits) / len(hits), f"{sample.task}_em": float(all(hits))}
    logits = torch.cat([last[None], continue_with(runner, cache, sample.cont[:-1], n)])
    greedy = torch.cat([last[None], continue_with(runner, cache, ref["greedy"][:-1], n)]).argmax(-1).tolist()
    agree = next((i for i, (a, b) in enumerate(zip(greedy, ref["greedy"], strict=True)) if a != b), GREEDY)
    full = ref.get("logits", logits)
    kl = F.kl_div(logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return {
        "top1": (logits.argmax(-1) == full.argmax(-1)).float().mean().item(),
        "greedy": agree / GREEDY,
        "kl": kl,
    }


def full_prefill(runner, ids: list[int], window: int):
    """Prefill with the full cache, the last `window` tokens in their own chunk with captured queries."""
    cache = runner.new_cache()
    runner.prefill(cache, ids[:-window])
    capture = WindowCapture(window)
    pos = torch.arange(len(ids) - window, len(ids))
    last = runner.forward(cache, torch.tensor(ids[-window:]), pos, last_only=True, window_capture=capture)[-1]
    return cache, capture, last


VALUE_NORMS: str | None = None  # --value-norms: overrides the defensive policies' own choice


def _policy(name: str):
    if VALUE_NORMS is not None and name in ("defensive", "layer_defensive"):
        return make_policy(name, value_norms=VALUE_NORMS)
    return make_policy(name)


def run_one_shot(runner, sample: Sample, budgets, window: int, policies=POLICIES) -> tuple[list[dict], dict]:
    """Rows for the full cache and every (policy, budget), and the full cache's references."""
    cache, capture, last = full_prefill(runner, sample.ids, window)
    n, rows = len(sample.ids), []
    _, H, _, D = cache.layers[0].keys.shape
    ref: dict = {"row_bytes": 2 * H * D * cache.layers[0].keys.element_size() * len(cache.layers)}
    if sample.task == "fidelity":
        greedy, logits = [], last
        for i in range(GREEDY):  # the full cache's own greedy continuation
            greedy.append(int(logits.argmax()))
            logits = runner.step(cache, torch.tensor(greedy[-1:]), torch.tensor([n + i]), None)[0]
        cache.truncate_new(GREEDY, 0)
        ref["greedy"] = greedy
        ref["logits"] = torch.cat([last[None], continue_with(runner, cache, sample.cont[:-1], n)])
    rows.append(
        {
            "mode": "one-shot",
            "policy": "full",
            "budget": 1.0,
            "kept": 1.0,
            **score(runner, cache, sample, last, ref),
        }
    )
    for budget in budgets:
        for name in policies:
            policy = _policy(name)
            evicted = copy.deepcopy(cache)
            compress(evicted, policy, capture, Eviction(policy, budget, window).keep(n), window)
            kept, memory = kept_and_memory(evicted, n)
            metrics = score(runner, evicted, sample, last, ref)
            rows.append(
                {"mode": "one-shot", "policy": name, "budget": budget, "kept": kept, "memory": memory, **metrics}
            )
    return rows, ref


def kept_and_memory(cache, n: int) -> tuple[float, float]:
    """(real entries, rows held including padding) per layer and KV head, over the prompt's n."""
    return cache.mean_length() / n, sum(cache.lengths()) / (n * len(cache.layers))


def run_chunked(runner, sample: Sample, budget: float, window: int, ref: dict, policies=POLICIES) -> list[dict]:
    rows = []
    n = len(sample.ids)
    for name in policies:
        cache, trace = runner.new_cache(), PrefillTrace()
        last = runner.prefill(cache, sample.ids, eviction=Eviction(_policy(name), budget, window), trace=trace)
        kept, memory = kept_and_memory(cache, n)
        row = {"mode": "chunked", "policy": name, "budget": budget, "kept": kept, "memory": memory}
        row["peak"] = trace.peak_bytes / (ref["row_bytes"] * n)
        rows.append({**row, **score(runner, cache, sample, last, ref)})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean metric per (mode, policy, budget); loss per task vs the full cache."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["policy"], r["budget"]), []).append(r)
    full = groups[("one-shot", "full", 1.0)]
    base = {t: statistics.mean(r[t] for r in full if t in r) for t in (*TASKS, "kl") if any(t in r for r in full)}
    extra = ("kl", "passkey_em", "kv_em", "qa_em")
    out = []
    for (mode, policy, budget), rs in groups.items():
        s = {"mode": mode, "policy": policy, "budget": budget, "kept": statistics.mean(r["kept"] for r in rs)}
        s["memory"] = statistics.mean(r.get("memory", r["kept"]) for r in rs)
        if any("peak" in r for r in rs):
            s["peak"] = max(r["peak"] for r in rs)
        for t in (*TASKS, *extra):
            vals = [r[t] for r in rs if t in r]
            if vals:
                s[t] = statistics.mean(vals)
                s[f"n_{t}"] = len(vals)
        for t in TASKS:
            if t in s and base.get(t, 0) > 0:
                s[f"loss_{t}"] = 1 - s[t] / base[t]
        losses = [s[f"loss_{t}"] for t in TASKS if f"loss_{t}" in s]
        s["loss"] = statistics.mean(losses) if losses else float("nan")
        out.append(s)
    return out


def bootstrap(rows: list[dict], resamples: int, seed: int = 0, baseline: str = "snapkv") -> str:
    """90 % intervals of each one-shot policy's overall loss and of its ratio to `baseline`'s,
    resampling prompts with replacement (each prompt's rows stay together) and recomputing every
    loss against the resampled full-cache scores."""
    prompts: list[list[dict]] = []
    for r in rows:
        if r["mode"] != "one-shot":
            continue
        if r["policy"] == "full":
            prompts.append([])
        prompts[-1].append(r)
    rng = random.Random(seed)
    draws: dict[tuple, list[list[float]]] = {}
    for _ in range(resamples):
        picked = [r for _ in prompts for r in rng.choice(prompts)]
        losses = {(s["policy"], s["budget"]): s["loss"] for s in summarize(picked)}
        for (policy, budget), loss in losses.items():
            base = losses.get((baseline, budget))
            draws.setdefault((policy, budget), [[], []])[0].append(loss)
            if base:  # a resample where the baseline lost nothing has no ratio (counted below)
                draws[(policy, budget)][1].append(loss / base)
    lines = [
        f"| policy | budget | overall loss, 90 % interval | loss / {baseline}'s, 90 % interval |",
        "|---|---|---|---|",
    ]
    for (policy, budget), (losses, ratios) in sorted(draws.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if policy == "full":
            continue
        lo, hi = _interval(losses)
        rlo, rhi = _interval(ratios)
        ratio = "1" if policy == baseline else f"{rlo:.2f}-{rhi:.2f}"
        if policy != baseline and len(ratios) < len(losses):
            ratio += f" ({len(losses) - len(ratios)} resamples without a ratio)"
        lines.append(f"| {policy} | {100 * budget:.0f}% | {100 * lo:.0f}-{100 * hi:.0f}% | {ratio} |")
    return "\n".join(lines)


def _interval(values: list[float]) -> tuple[float, float]:
    xs = sorted(v for v in values if v == v)  # nan: a resample where a loss is undefined
    return (xs[int(0.05 * (len(xs) - 1))], xs[int(0.95 * (len(xs) - 1))]) if xs else (float("nan"), float("nan"))


def markdown(summary: list[dict]) -> str:
    head = (
        "| mode | policy | budget | KV kept | KV memory | peak KV | passkey | kv | qa | top1 | greedy | KL "
        "| exact match passkey / kv / qa | loss passkey / kv / qa / top1 / greedy | overall loss |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
        cells = [
            s["mode"], s["policy"], "full" if s["policy"] == "full" else pct(s["budget"]), pct(s["kept"]),
            pct(s["memory"]), pct(s["peak"]) if "peak" in s else "",
            *(f"{s[t]:.2f}" if t in s else "" for t in TASKS),
            f"{s['kl']:.3f}" if "kl" in s else "",
            " / ".join(f"{s[t]:.2f}" if t in s else "-" for t in ("passkey_em", "kv_em", "qa_em")),
            " / ".join(pct(s[f"loss_{t}"]) if f"loss_{t}" in s else "-" for t in TASKS),
            pct(s["loss"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated KV policies (the full cache always runs)"
    )
    ap.add_argument("--passkey", type=int, default=9, help="pass-key samples (depths cycle 10/50/90%%)")
    ap.add_argument("--kv", type=int, default=9, help="key-value retrieval samples")
    ap.add_argument("--qa", type=int, default=9, help="document question samples (eviction_tasks.QUESTIONS, cycled)")
    ap.add_argument("--fidelity", type=int, default=6, help="document-continuation samples")
    ap.add_argument("--length", type=int, default=1000, help="document tokens per prompt")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument(
        "--value-norms",
        choices=("rows", "heads"),
        help="normalise the value norms of defensive and layer_defensive this way (default: each policy's own)",
    )
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk of the chunked rows")
    ap.add_argument("--chunked-budget", type=float, default=0.2)
    ap.add_argument("--chunked-samples", type=int, default=2, help="per task; 0 = no chunked rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write every per-sample row here")
    ap.add_argument("--bootstrap", type=int, default=0, help="resamples for 90%% intervals of the losses (0 = none)")
    ap.add_argument("--from-json", help="summarise the rows of an earlier --json run instead of running")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["rows"]
        print(markdown(summarize(rows)))
        if args.bootstrap:
            print("\n" + bootstrap(rows, args.bootstrap, args.seed))
        return
    policies = [p for p in args.policies.split(",") if p and p != "full"]
    global VALUE_NORMS
    VALUE_NORMS = args.value_norms
    for name in policies:
        make_policy(name)  # an unknown name fails here, before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.time()
    settings = Settings()
    model, tok = load_model(resolve_model_path(settings.model, settings.cache_dir), "float32", "cpu")
    runner = ModelRunner(model, prefill_chunk=args.chunk)
    samples = make_samples(tok, args, random.Random(args.seed))
    rows, chunked_left = [], {t: args.chunked_samples for t in ("passkey", "kv", "qa", "fidelity")}
    for i, sample in enumerate(samples):
        t0 = time.time()
        one_shot, ref = run_one_shot(runner, sample, args.budgets, args.window, policies)
        rows += one_shot
        if chunked_left[sample.task] > 0:
            chunked_left[sample.task] -= 1
            rows += run_chunked(runner, sample, args.chunked_budget, args.window, ref, policies)
        print(
            f"[{i + 1}/{len(samples)}] {sample.task} {len(sample.ids)} tokens {time.time() - t0:.0f}s",
            file=sys.stderr,
        )
    summary = summarize(rows)
    print(markdown(summary))
    if args.bootstrap:
        print("\n" + bootstrap(rows, args.bootstrap, args.seed))
    print(f"\n{len(samples)} samples ({', '.join(f'{t}: {sum(s.task == t for s in samples)}' for t in ('passkey', 'kv', 'qa', 'fidelity'))}), "
          f"prompts {min(len(s.ids) for s in samples)}-{max(len(s.ids) for s in samples)} tokens, "
          f"window {args.window}, chunk {args.chunk}, {time.time() - started:.0f}s, torch threads {torch.get_num_threads()}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
