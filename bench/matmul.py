"""What a forward of N rows costs against a one-row step, with and without the skinny matmul.

    python bench/matmul.py [--prefix 300] [--rounds 4] [--rows 2,3,4,6,8,12,16,24,32]

One sequence holds a prefilled cache of `prefix` tokens; each forward adds N causal rows (the
shape of a lookahead step) and is then cut off again. Stock `F.linear` and `SkinnyLinear`
(server/matmul.py) are timed interleaved over several rounds; the fastest run of each is kept
(`matmul.measure_routes`, the same measurement the server makes at start-up). The last line is
the `--skinny-rows` value the server would pick from this table.
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
    stock, skinny = matmul.measure_routes(runner, sizes, prefix=args.prefix, rounds=args.rounds)
    one = min(stock[1], skinny[1])
    print(f"threads={torch.get_num_threads()} prefix={args.prefix} one-row step {one * 1e3:.1f} ms")
    print("| rows | stock ms | skinny ms | stock / one row | skinny / one row |")
    print("|---:|---:|---:|---:|---:|")
    for n in sorted(stock):
        if n > 1:
            s, k = stock[n], skinny[n]
            print(f"| {n} | {s * 1e3:.1f} | {k * 1e3:.1f} | {s / one:.2f}x | {k / one:.2f}x |")
    print(
        f"picked: --skinny-rows {matmul.pick_max_rows(stock, skinny)} (skinny >= {matmul.MARGIN:.0%} faster at every size up to it)"
    )


if __name__ == "__main__":
    main()
