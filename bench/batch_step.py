"""What a batched decode step costs against a one-sequence step on this machine.

    python bench/batch_step.py [--prefix 170] [--repeats 6]

Each of B sequences holds a prefilled cache of `prefix` tokens; one `step_batch` forward adds
one row per sequence. Also prints what the prefill of `prefix` tokens costs (one sequence). Prints the fastest of `repeats` runs per batch size, and the ratio to
B = 1: below B means batching raises decode throughput (B / ratio = the throughput gain).
"""

from __future__ import annotations

import argparse
import time

import torch
from trieserve.server.batch import StepRows
from trieserve.server.builder import skinny_rows
from trieserve.server.model import load_model, prepare_default_model
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=170)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--profile", action="store_true", help="torch-profile the largest batch's steps: top ops")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    settings = Settings()
    path = prepare_default_model(settings.cache_dir)
    model, _ = load_model(path, "float32", "cpu")
    runner = ModelRunner(model, prefill_chunk=512, skinny_rows=0)
    runner.set_skinny_rows(skinny_rows(settings, runner, path.name))  # the server's matmul route
    prompt = [100 + i % 1000 for i in range(args.prefix)]
    base = None
    prefill = float("inf")
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        runner.prefill(runner.new_cache(), prompt)
        prefill = min(prefill, time.perf_counter() - start)
    print(f"threads={torch.get_num_threads()} prefix={args.prefix} prefill of the prefix: {prefill * 1e3:.1f} ms")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        caches = []
        for _ in range(b):
            cache = runner.new_cache()
            runner.prefill(cache, prompt)
            caches.append(cache)
        best = float("inf")
        for i in range(args.repeats + 1):  # the first run warms up and is not counted
            rows = [StepRows(torch.tensor([5]), torch.tensor([args.prefix + i]), None) for _ in range(b)]
            start = time.perf_counter()
            runner.step_batch(caches, rows)
            if i:
                best = min(best, time.perf_counter() - start)
        base = base or best
        print(f"B={b}: {best * 1e3:.1f} ms per step, {best / base:.2f}x B=1, throughput {b * base / best:.2f}x B=1")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.repeats):
                rows = [StepRows(torch.tensor([5]), torch.tensor([args.prefix + 100 + i]), None) for _ in range(b)]
                runner.step_batch(caches, rows)
        print(f"B={b}, {args.repeats} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
