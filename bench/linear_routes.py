"""CPU matmul routes for few-row forwards, on the default model's layer shapes (no model needed).

    python bench/linear_routes.py [--rounds 5] [--rows 1,2,3,4,6,8,12,16,32]

Times one pass over 30 layers' worth of SmolLM2-135M's decoder projections (the lean forward's
fused shapes: q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536; separate random fp32
weights per layer, so the pass streams ~0.42 GB as a forward does) for each row count, by route:

    stock   F.linear (MKL): a matrix-vector kernel for 1-3 rows, a GEMM from 4
    skinny  weight @ x.T, a route server/matmul.py can switch to
    stream  server/stream_linear.cpp, the C++ kernel server/matmul.py can switch to (built here on
            first use; left out when it cannot be built)
    onednn  oneDNN's linear over a weight reordered once for it (torch.ops.mkldnn), which keeps
            a second copy of every weight: twice the weight memory

Prints the fastest of `--rounds` passes (interleaved) in ms per route and row count. A route
the server does not take (onednn) is here to show what it would give.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from trieserve.server import matmul
from trieserve.server.settings import Settings

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,32")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    weights = [[torch.randn(n, k) * 0.02 for n, k in SHAPES] for _ in range(LAYERS)]
    routes = {
        "stock": lambda x, w, _p: F.linear(x, w),
        "skinny": lambda x, w, _p: (w @ x.T).T.contiguous(),
    }
    kernel = matmul.load_stream(Settings().cache_dir / "ext")
    if kernel is not None:
        routes["stream"] = lambda x, w, _p: kernel.stream_linear(x, w, None)
    packs = None
    if torch.backends.mkldnn.is_available():
        packs = [[torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in ws] for ws in weights]
        routes["onednn"] = lambda x, _w, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    print(f"threads={torch.get_num_threads()}; ms per pass over {LAYERS} layers, fastest of {args.rounds}")
    print("rows  " + "  ".join(f"{r:>8}" for r in routes))
    for m in (int(r) for r in args.rows.split(",")):
        xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
        best = dict.fromkeys(routes, float("inf"))
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, fn in routes.items():
                start = time.perf_counter()
                for i, ws in enumerate(weights):
                    for j, w in enumerate(ws):
                        fn(xs[w.shape[1]], w, packs[i][j] if packs else None)
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"{m:>4}  " + "  ".join(f"{best[r] * 1e3:8.1f}" for r in routes), flush=True)


if __name__ == "__main__":
    main()
