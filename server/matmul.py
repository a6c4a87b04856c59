"""A faster CPU matmul for the few-row forwards that lookahead and batching run.

A decode step multiplies every weight matrix by a handful of rows: one for a plain step, 2-16
for a draft tree or a small batch. On CPU, PyTorch's `F.linear` sends one row to a matrix-vector
kernel that streams the weights at memory bandwidth, but hands 2-16 rows to a general matrix
multiply that, on some BLAS/CPU pairs (MKL on AMD EPYC, measured by `bench/matmul.py`), costs
about twice the one-row step: the tree a lookahead step verifies then costs two plain steps and
rarely pays. Computing the same product as `weight @ x.T` (the weights as the tall operand)
costs 1.0-1.25 plain steps up to 8 rows; from ~10 rows MKL's own kernel is as fast.

`install(model)` switches the model's `nn.Linear` modules to `SkinnyLinear`, which takes that
route for 2..`max_rows` rows (`--skinny-rows`) and is `F.linear` otherwise; the weights, tying
and the model's code are untouched. Only CPU models are switched (GPUs run both shapes at full speed). Each
output element is the same dot product; only the summation order inside the BLAS kernel may
differ, as it already does between one row and several.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 9  # on a 2-core EPYC (bench/matmul.py) the gain fades from ~10 rows, where F.linear is as fast


class SkinnyLinear(nn.Linear):
    """nn.Linear computing 2..max_rows rows as `weight @ x.T` (see the module docstring)."""

    max_rows = MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 2 <= rows <= self.max_rows:
            return F.linear(x, self.weight, self.bias)
        # contiguous: a transposed view sends the next attention call off its fast (flash) path
        out = (self.weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.weight.shape[0])


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
