"""What a forward of N rows costs against a one-row step, with and without the skinny matmul.

    python bench/matmul.py [--prefix 300] [--rounds 4] [--rows 1,2,3,4,6,8,12,16,24,32]

One sequence holds a prefilled cache of `prefix` tokens; each forward adds N causal rows (the
shape of a lookahead step) and is then cut off again. Stock `F.linear` and `SkinnyLinear`
(server/matmul.py) are timed interleaved over several rounds; the fastest run of each is kept.
The `--skinny-rows` default is the largest N where the skinny route still wins here.
"""

from __future__ import annotations

import argparse
import time

import torch
from trieserve.server import matmul
from trieserve.server.model import load_model, prepare_default_model
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,24,32")
    args = ap.parse_args()
    sizes = [int(x) for x in args.rows.split(",")]
    torch.set_grad_enabled(False)
    model, _ = load_model(prepare_default_model(Settings().cache_dir), "float32", "cpu")
    runner = ModelRunner(model, skinny_rows=max(sizes))
    cache = runner.new_cache()
    runner.prefill(cache, [100 + i % 1000 for i in range(args.prefix)])
    best = {}
    for r in range(args.rounds + 1):  # round 0 warms every shape up and is not counted
        for mode in ("stock", "skinny"):
            (matmul.install if mode == "skinny" else matmul.uninstall)(model)
            for n in sizes:
                mask = torch.ones(n, n, dtype=torch.bool).tril_()
                start = time.perf_counter()
                runner.step(cache, torch.full((n,), 100), torch.arange(args.prefix, args.prefix + n), mask)
                seconds = time.perf_counter() - start
                cache.truncate_new(n, 0)
                if r:
                    best[mode, n] = min(best.get((mode, n), float("inf")), seconds)
    one = min(best["stock", 1], best["skinny", 1])
    print(f"threads={torch.get_num_threads()} prefix={args.prefix} one-row step {one * 1e3:.1f} ms")
    print("| rows | stock ms | skinny ms | stock / one row | skinny / one row |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        s, k = best["stock", n], best["skinny", n]
        print(f"| {n} | {s * 1e3:.1f} | {k * 1e3:.1f} | {s / one:.2f}x | {k / one:.2f}x |")


if __name__ == "__main__":
    main()
