"""What a forward of N rows costs against a one-row step, with stock F.linear and each few-row kernel.

    python bench/matmul.py [--prefix 300] [--rounds 4] [--rows 2,3,4,6,8,12,16,24,32]

One sequence holds a prefilled cache of `prefix` tokens; each forward adds N causal rows (the
shape of a lookahead step) and is then cut off again. Stock `F.linear` and the few-row kernels
of server/matmul.py (`skinny`; `stream`, built here on first use) are timed interleaved over
several rounds; the fastest run of each is kept (`matmul.measure_routes`, the same measurement
the server makes at start-up). The last line is the route the server would pick from this table
(`--matmul-kernel`, `--skinny-rows`).
"""

from __future__ import annotations

import argparse

import torch
from trieserve.server import matmul
from trieserve.server.model import load_model, prepare_default_model
from trieserve.server.runner import ModelRunner
from trieserve.server.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rows", default="2,3,4,6,8,12,16,24,32")
    args = ap.parse_args()
    sizes = tuple(int(x) for x in args.rows.split(","))
    torch.set_grad_enabled(False)
    model, _ = load_model(prepare_default_model(Settings().cache_dir), "float32", "cpu")
    runner = ModelRunner(model, skinny_rows=0)
    matmul.load_stream(Settings().cache_dir / "ext")
    best = matmul.measure_routes(runner, sizes, prefix=args.prefix, rounds=args.rounds)
    arms = list(best)
    one = min(best[a][1] for a in arms)
    print(f"threads={torch.get_num_threads()} prefix={args.prefix} one-row step {one * 1e3:.1f} ms")
    print("| rows | " + " | ".join(f"{a} ms" for a in arms) + " | " + " | ".join(f"{a} / one row" for a in arms) + " |")
    print("|---:|" + "---:|" * (2 * len(arms)))
    for n in sorted(best["stock"]):
        if n >= 1:
            ms = " | ".join(f"{best[a][n] * 1e3:.1f}" for a in arms)
            ratios = " | ".join(f"{best[a][n] / one:.2f}x" for a in arms)
            print(f"| {n} | {ms} | {ratios} |")
    route = matmul.pick_route(best)
    print(
        f"picked: --matmul-kernel {route.kernel} --skinny-rows {route.max_rows} (the largest size where the kernel is >= {matmul.MARGIN:.0%} faster than stock, none below it >= {matmul.MARGIN:.0%} slower); "
        f"one row: {'the kernel' if route.min_rows == 1 else 'F.linear'}"
    )


if __name__ == "__main__":
    main()
