"""A faster CPU matmul for the few-row forwards that lookahead and batching run.

A decode step multiplies every weight matrix by a handful of rows: one for a plain step, 2-16
for a draft tree or a small batch. On CPU, PyTorch's `F.linear` sends one row to a matrix-vector
kernel that streams the weights at memory bandwidth, but hands 2-16 rows to a general matrix
multiply that, on some BLAS/CPU pairs (MKL on AMD EPYC, measured by `bench/matmul.py`), costs
about twice the one-row step: the tree a lookahead step verifies then costs two plain steps and
rarely pays. Computing the same product as `weight @ x.T` (the weights as the tall operand)
costs 1.0-1.25 plain steps up to 8 rows; from ~10 rows MKL's own kernel is as fast.

Whether it wins depends on the BLAS and the CPU: on an Intel Xeon with AMX (same torch build)
stock `F.linear` costs 1.1-1.6 one-row steps at 2-4 rows and the skinny route ~2, the reverse
of the EPYC. So the range is not a constant: `measure_routes` times whole-model forwards of
2..16 rows both ways (interleaved, fastest of several rounds) and `pick_max_rows` takes the
largest N where the skinny route wins clearly at every measured size up to N (0 when it loses
at 2 rows). The server does this once per machine at start-up and caches the answer
(`cached_max_rows`); `--skinny-rows N` forces a value.

`install(model)` switches the model's `nn.Linear` modules to `SkinnyLinear`, which takes that
route for 2..`max_rows` rows and is `F.linear` otherwise (the lean forward, server/lean.py,
calls the same `linear` with the runner's range); the weights, tying and the model's
code are untouched. Only CPU models are switched (GPUs run both shapes at full speed). Each
output element is the same dot product; only the summation order inside the BLAS kernel may
differ, as it already does between one row and several.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from trieserve.decoding.trie import write_atomically

log = logging.getLogger(__name__)

MAX_ROWS = 9  # on a 2-core EPYC (bench/matmul.py) the gain fades from ~10 rows, where F.linear is as fast
MEASURED_ROWS = (2, 3, 4, 6, 8, 12, 16)
MARGIN = 0.05  # the skinny route must be this much faster to be taken: a tie is noise, not a win


class SkinnyLinear(nn.Linear):
    """nn.Linear computing 2..max_rows rows as `weight @ x.T` (see the module docstring)."""

    max_rows = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.max_rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> torch.Tensor:
    """F.linear, computed as `weight @ x.T` when x has 2..max_rows rows (the skinny route)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 2 <= rows <= max_rows:
        return F.linear(x, weight, bias)
    # contiguous: a transposed view sends the next attention call off its fast (flash) path
    out = (weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def install(model: nn.Module, max_rows: int = MAX_ROWS) -> int:
    """Switch a CPU model's linear layers to SkinnyLinear (in place; again only updates
    `max_rows`). Returns how many layers take the skinny route."""
    if max_rows < 2 or next(model.parameters()).device.type != "cpu":
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
        if isinstance(module, SkinnyLinear):
            module.max_rows = max_rows
            count += 1
    return count


def uninstall(model: nn.Module) -> int:
    """Undo `install` (stock nn.Linear everywhere). Returns how many were switched back."""
    count = 0
    for module in model.modules():
        if type(module) is SkinnyLinear:
            module.__class__ = nn.Linear
            count += 1
    return count


def measure_routes(
    runner, rows: tuple[int, ...] = MEASURED_ROWS, prefix: int = 128, rounds: int = 3
) -> tuple[dict[int, float], dict[int, float]]:
    """Seconds of one forward of each row count (one sequence, `prefix` tokens cached, causal
    rows: a lookahead step's shape) with stock `F.linear` and with the skinny route, interleaved
    over `rounds` (plus a warm-up round); the fastest of each is kept. Leaves the model with
    stock linears; the caller installs what it picks. Returns (stock, skinny) by row count."""
    sizes = sorted({1, *rows})
    arms = {"stock": lambda: runner.set_skinny_rows(0), "skinny": lambda: runner.set_skinny_rows(max(sizes))}
    best = runner.time_row_forwards(sizes, prefix, rounds, arms)
    runner.set_skinny_rows(0)
    return best["stock"], best["skinny"]


def pick_max_rows(stock: dict[int, float], skinny: dict[int, float], margin: float = MARGIN) -> int:
    """The largest measured N (>= 2) such that the skinny route is faster by `margin` at every
    measured size from 2 to N; 0 when it is not at 2 rows. Sizes between the last win and the
    first loss are left to `F.linear` (unmeasured, so not assumed to win)."""
    chosen = 0
    for n in sorted(k for k in stock if k >= 2 and k in skinny):
        if skinny[n] > (1 - margin) * stock[n]:
            break
        chosen = n
    return chosen


def cached_max_rows(runner, path: Path) -> int:
    """`pick_max_rows` for this machine: read from `path` when it was measured before, else
    measured now (a few seconds) and written there. Non-CPU models: 0, nothing measured."""
    if runner.device.type != "cpu":
        return 0
    try:
        data = json.loads(path.read_text())
        return int(data["max_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    stock, skinny = measure_routes(runner)
    chosen = pick_max_rows(stock, skinny)
    table = ", ".join(f"{n}:{stock[n] * 1e3:.0f}/{skinny[n] * 1e3:.0f}ms" for n in sorted(stock))
    log.info("matmul route by rows (stock/skinny): %s -> skinny for 2..%d rows", table, chosen)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"max_rows": chosen, "stock": stock, "skinny": skinny}
        write_atomically(path, json.dumps(record).encode())
    except OSError as exc:
        log.warning("could not cache the matmul route at %s: %s", path, exc)
    return chosen
