"""What a batched decode step costs against a one-sequence step on this machine.

    python bench/batch_step.py [--prefix 170] [--repeats 6] [--forwards lean,transformers] [--attention sdpa,kernel]
    python bench/batch_step.py --prefix 340 --batch-sizes 1,8 --tree-rows 4 --tree-seqs 4 --attention sdpa,kernel

Each of B sequences holds a prefilled cache of `prefix` tokens; one `step_batch` forward adds
one row per sequence. Also prints what the prefill of `prefix` tokens costs (one sequence). Prints the fastest of `repeats` runs per batch size, and the ratio to
B = 1: below B means batching raises decode throughput (B / ratio = the throughput gain).
With several `--forwards`, each batch size is timed on each forward (lean: server/lean.py;
transformers: the model's own forward) over the same model, alternating run by run; likewise
with several `--attention` choices for the one-row parts (sdpa: one SDPA call per sequence and
layer; kernel: the C++ attention kernel and KV append, all sequences in one call per layer). With
`--tree-rows T`, the first `--tree-seqs` sequences of each step (all by default) carry a draft
tree of T rows (the last token and a chain of T - 1 nodes) instead of one row, as a lookahead step
does: what verifying drafts costs in a batch.
"""

from __future__ import annotations

import argparse
import time

import torch
from trieserve.server.batch import StepRows
from trieserve.server.builder import decode_kernels, matmul_route
from trieserve.server.model import load_model, prepare_default_model
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings


def step_rows(t: int, position: int) -> StepRows:
    """One sequence's part of a step: the last token, and a chain of t - 1 draft nodes after it."""
    mask = torch.ones(t, t, dtype=torch.bool).tril_() if t > 1 else None
    return StepRows(torch.full((t,), 5), torch.arange(position, position + t), mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=170)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--profile", action="store_true", help="torch-profile the largest batch's steps: top ops")
    ap.add_argument("--forwards", default="lean", help="comma-separated: lean, transformers")
    ap.add_argument("--attention", default="kernel", help="comma-separated: sdpa, kernel (decode rows and trees)")
    ap.add_argument("--tree-rows", type=int, default=1, help="rows of each drafting sequence's part (1: no draft)")
    ap.add_argument("--tree-seqs", type=int, default=None, help="sequences per step that draft (default: all)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    settings = Settings()
    path = prepare_default_model(settings.cache_dir)
    model, _ = load_model(path, "float32", "cpu")
    runners = {}
    for forward in args.forwards.split(","):
        if forward not in ("lean", "transformers"):
            ap.error(f"unknown forward {forward!r}")
        for attention in args.attention.split(","):
            if attention not in ("sdpa", "kernel"):
                ap.error(f"unknown attention {attention!r}")
            name = forward if "," not in args.attention else f"{forward}/{attention}"
            runners[name] = ModelRunner(model, prefill_chunk=512, skinny_rows=0, lean=forward == "lean")
            kernels = decode_kernels(settings.model_copy(update={"decode_attention": attention}), runners[name])
            runners[name].use_kernels(kernels)
    runner = next(iter(runners.values()))
    route = matmul_route(settings, runner, path.name)  # the server's matmul route
    for r in runners.values():
        r.set_route(route)
    prompt = [100 + i % 1000 for i in range(args.prefix)]
    prefill = dict.fromkeys(runners, float("inf"))
    for _ in range(args.repeats + 1):
        for name, r in runners.items():
            start = time.perf_counter()
            r.prefill(r.new_cache(), prompt)
            prefill[name] = min(prefill[name], time.perf_counter() - start)
    for name in runners:
        print(
            f"threads={torch.get_num_threads()} prefix={args.prefix} {name}: prefill of the prefix {prefill[name] * 1e3:.1f} ms"
        )
    base: dict[str, float] = {}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        caches = {}
        for name, r in runners.items():
            caches[name] = []
            for _ in range(b):
                cache = r.new_cache()
                r.prefill(cache, prompt)
                caches[name].append(cache)
        best = dict.fromkeys(runners, float("inf"))
        drafting = b if args.tree_seqs is None else min(args.tree_seqs, b)
        for i in range(args.repeats + 1):  # the first run warms up and is not counted
            for name, r in runners.items():
                rows = [step_rows(args.tree_rows if s < drafting else 1, args.prefix + i) for s in range(b)]
                start = time.perf_counter()
                r.step_batch(caches[name], rows)
                if i:
                    best[name] = min(best[name], time.perf_counter() - start)
                for cache, part in zip(caches[name], rows, strict=True):  # keep the root row only
                    cache.keep_path(part.input_ids.numel(), [0])
        for name in runners:
            base.setdefault(name, best[name])
            ratio = best[name] / base[name]
            print(
                f"{name} B={b}: {best[name] * 1e3:.1f} ms per step, {ratio:.2f}x B=1, throughput {b / ratio:.2f}x B=1"
                + (f" ({drafting} with {args.tree_rows}-row trees)" if args.tree_rows > 1 else "")
            )
        cache_list = caches[next(iter(runners))]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.repeats):
                rows = [StepRows(torch.tensor([5]), torch.tensor([args.prefix + 100 + i]), None) for _ in range(b)]
                runner.step_batch(cache_list, rows)
        print(f"B={b}, {args.repeats} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
