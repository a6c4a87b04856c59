"""Faster CPU matmuls for the few-row forwards that lookahead and batching run.

A decode step multiplies every weight matrix by a handful of rows: one for a plain step, 2-32
for a draft tree or a small batch. On CPU, PyTorch's `F.linear` sends one row to a matrix-vector
kernel that streams the weights at memory bandwidth, but hands 4-32 rows to a general matrix
multiply that costs 1.5-2.5 one-row steps (MKL; `bench/matmul.py`): the tree a lookahead step
verifies, or a batch of sequences, then costs nearly two plain steps. Two other kernels exist
for 2..`max_rows` rows (and one row, where the measurement below finds the kernel faster):

- `skinny`: the same product as `weight @ x.T` (the weights as the tall operand). On an AMD EPYC
  it costs 1.0-1.25 plain steps up to 8 rows; on an Intel Xeon with AMX, about two.
- `stream`: server/stream_linear.cpp, a small C++ kernel built at first use with the machine's
  C++ compiler (`-march=native`; cached under CACHE_DIR/ext). Each thread streams its slice of
  the weights once, a few rows at a time, multiplying them with every input row while they are
  in registers, and prefetches the next rows. On the Xeon: 1.1 one-row steps at 4 rows, 1.3 at
  8, against 1.7 and 2.1 for `F.linear` (`bench/linear_routes.py`). A row's result does not depend
  on how many rows share the call. Without a compiler it is simply not offered.

Which wins depends on the BLAS and the CPU, so the choice is measured, not fixed:
`measure_routes` times whole-model forwards of 1..32 rows with each kernel (interleaved, fastest
of several rounds) and `pick_route` takes, for each kernel, the largest N where it beats stock
`F.linear` clearly at every measured size from 2 up to N, then the kernel with the larger N; the
chosen kernel takes one-row forwards too (a plain decode step) when it beats stock there clearly.
On the Xeon, MKL's matrix-vector kernel is as fast as streaming gets; on a 2-core AMD EPYC
(AVX2) `F.linear` of one row reads the weights at half the stream kernel's speed (the 49152-row
output head: 10.3 against 5.3 ms, timed alone). The server does this once per machine at start-up and caches
the answer (`cached_route`); `--skinny-rows N` and `--matmul-kernel` force either part (with
both forced, one row stays on `F.linear`).

`install(model, max_rows, kernel, min_rows)` switches the model's `nn.Linear` modules to
`SkinnyLinear`, which takes the kernel for `min_rows`..`max_rows` rows (`min_rows` 1 or 2) and is
`F.linear` otherwise (the lean forward,
server/lean.py, calls the same `linear` with the runner's route); the weights, tying and the
model's code are untouched. Only CPU models are switched (GPUs run both shapes at full speed).
Each output element is the same dot product; only the summation order may differ, as it
already does inside the BLAS between one row and several.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from trieserve.decoding.trie import write_atomically

log = logging.getLogger(__name__)

MAX_ROWS = 9  # on a 2-core EPYC (bench/matmul.py) the skinny kernel's gain fades from ~10 rows
MEASURED_ROWS = (2, 3, 4, 6, 8, 12, 16, 24, 32)
MARGIN = 0.05  # a kernel must be this much faster than F.linear to be taken: a tie is noise, not a win
KERNELS = ("skinny", "stream")
SOURCE = Path(__file__).with_name("stream_linear.cpp")

_stream: ModuleType | None = None  # the built stream kernel, once `load_stream` succeeded
ROUTE_FORMAT = 2  # cached route files of another format are measured again (1: one row never timed)


class Route(NamedTuple):
    """The few-row matmul route: `kernel` computes forwards of `min_rows`..`max_rows` rows
    (max_rows 0: stock `F.linear` everywhere)."""

    kernel: str = "skinny"
    max_rows: int = 0
    min_rows: int = 2


STOCK = Route()


STALE_LOCK_S = 600.0  # a build lock this old was left by a build that was killed
UNUSED_BUILD_S = 14 * 86400.0  # another key's build not loaded for this long is removed


def stream_key() -> str:
    """What the built kernel depends on: its source, torch, and this CPU (-march=native)."""
    salt = f"|{torch.__version__}|{platform.machine()}|{cpu_signature()}|openmp"
    return hashlib.sha256(SOURCE.read_bytes() + salt.encode()).hexdigest()[:12]


def load_stream(build_root: Path) -> ModuleType | None:
    """Build (first time on a machine, ~30 s) or load the stream kernel; None when it cannot be
    built here (no C++ compiler, no ninja): the kernel is then not offered. The build directory
    is `stream-KEY` under `build_root` (`stream_key`), and it builds from its own copy of the
    source, so checkouts sharing the cache share one build."""
    global _stream
    if _stream is not None:
        return _stream
    key = stream_key()
    directory = build_root / f"stream-{key}"
    _ninja_on_path()
    try:
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        source = directory / SOURCE.name
        if not source.exists():  # the key covers the content: an existing copy is this source
            write_atomically(source, SOURCE.read_bytes())
        # torch's build lock: a build killed half-way leaves it, and every later start would wait on it forever
        lock = directory / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing a stale build lock left at %s", lock)
            lock.unlink(missing_ok=True)
        # -fopenmp: at::parallel_for is a header template that runs on one thread without it
        _stream = cpp_extension.load(
            f"trieserve_stream_{key}",
            [str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )
    except Exception as exc:  # a missing compiler shows up as several exception types
        reason = " ".join(str(exc).split())[-400:]
        log.warning("the stream matmul kernel could not be built, so it is not used: %s", reason)
        return None
    prune_builds(build_root, keep=directory)
    return _stream


def prune_builds(build_root: Path, keep: Path, max_age_s: float = UNUSED_BUILD_S) -> list[Path]:
    """Remove other `stream-*` builds not loaded for `max_age_s` (older sources, torch builds or
    CPUs); `keep` is marked as used now. A build another checkout still loads stays, as its
    loads keep it fresh. Returns what was removed."""
    os.utime(keep)
    removed = []
    for old in build_root.glob("stream-*"):
        try:
            if old != keep and old.is_dir() and time.time() - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old)
                removed.append(old)
        except OSError as exc:  # another process removing it, or no permission: not our problem
            log.debug("could not remove the old kernel build %s: %s", old, exc)
    return removed


def stream_available(runner=None) -> bool:
    """Whether the stream kernel is built (and, given a runner, can run its model: fp32 on CPU)."""
    if _stream is None or runner is None:
        return _stream is not None
    weight = next(runner.model.parameters())
    return weight.dtype == torch.float32 and weight.device.type == "cpu"


def _ninja_on_path() -> None:
    """torch builds with the `ninja` it finds on PATH; the `ninja` package installs one beside
    this Python, which is not on PATH when the venv is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def cpu_signature() -> str:
    """The first CPU's model name and instruction-set flags (x86 `flags`, Arm `Features`)."""
    lines: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                if line.startswith(("model name", "flags", "Features")):
                    lines.append(" ".join(line.split()))
    except OSError:
        pass
    return "|".join(lines) or platform.processor()


class SkinnyLinear(nn.Linear):
    """nn.Linear computing 2..max_rows rows with a few-row kernel (see the module docstring)."""

    max_rows = MAX_ROWS
    kernel = "skinny"
    min_rows = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.max_rows, self.kernel, self.min_rows)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    max_rows: int,
    kernel: str = "skinny",
    min_rows: int = 2,
) -> torch.Tensor:
    """F.linear, computed with `kernel` when x has min_rows..max_rows rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not min_rows <= rows <= max_rows:
        return F.linear(x, weight, bias)
    if kernel == "stream":
        return _stream.stream_linear(x, weight, bias)
    # contiguous: a transposed view sends the next attention call off its fast (flash) path
    out = (weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def install(model: nn.Module, max_rows: int = MAX_ROWS, kernel: str = "skinny", min_rows: int = 2) -> int:
    """Switch a CPU model's linear layers to SkinnyLinear with `kernel` for min_rows..max_rows
    rows (in place; again only updates the route). Returns how many layers take it."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown matmul kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if min_rows not in (1, 2):
        raise ValueError(f"min_rows must be 1 or 2, not {min_rows}")
    if kernel == "stream" and _stream is None:
        raise RuntimeError("the stream kernel is not built: call load_stream first")
    if max_rows < min_rows or next(model.parameters()).device.type != "cpu":
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
        if isinstance(module, SkinnyLinear):
            module.max_rows, module.kernel, module.min_rows = max_rows, kernel, min_rows
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
) -> dict[str, dict[int, float]]:
    """Seconds of one forward of each row count, one row included (one sequence, `prefix` tokens
    cached, causal rows: a lookahead step's shape) with stock `F.linear` and with each available kernel,
    interleaved over `rounds` (plus a warm-up round); the fastest of each is kept. Leaves the
    model with stock linears; the caller installs what it picks. Returns {"stock": {rows: s},
    "skinny": ..., "stream": ... (when built)}."""
    sizes = sorted({1, *rows})
    arms = {"stock": lambda: runner.set_skinny_rows(0)}
    for kernel in KERNELS:
        if kernel != "stream" or stream_available(runner):
            arms[kernel] = lambda k=kernel: runner.set_skinny_rows(max(sizes), k, min_rows=1)
    best = runner.time_row_forwards(sizes, prefix, rounds, arms)
    runner.set_skinny_rows(0)
    return best


def pick_max_rows(stock: dict[int, float], kernel: dict[int, float], margin: float = MARGIN) -> int:
    """The largest measured N (>= 2) where the kernel is faster than stock by `margin` and is not
    slower by more than `margin` at any measured size from 2 to N (a tie at 2-3 rows, where
    stock's matrix-vector kernel is at its best, does not hide clear wins above); 0 when there
    is none. Sizes between the last win and the first clear loss are left to `F.linear`
    (unmeasured, so not assumed to win)."""
    chosen = 0
    for n in sorted(k for k in stock if k >= 2 and k in kernel):
        if kernel[n] > (1 + margin) * stock[n]:
            break
        if kernel[n] <= (1 - margin) * stock[n]:
            chosen = n
    return chosen


def pick_route(best: dict[str, dict[int, float]], kernel: str | None = None) -> Route:
    """The route from `measure_routes`' timings: each kernel's `pick_max_rows`, and the kernel
    with the larger range; on a tie the one with the smaller total time over that range. The
    chosen kernel also takes one row when it is faster than stock there by `MARGIN` (a kernel
    that wins only at one row gets 1..1). `kernel` forces the kernel (its range still measured).
    `STOCK`: stock everywhere."""
    stock = best["stock"]
    ranges = {k: pick_max_rows(stock, best[k]) for k in KERNELS if k in best}

    def one_row(k: str) -> bool:
        return 1 in stock and 1 in best.get(k, {}) and best[k][1] <= (1 - MARGIN) * stock[1]

    def route(k: str) -> Route:
        if one_row(k):
            return Route(k, max(ranges.get(k, 0), 1), 1)
        return Route(k, ranges.get(k, 0))

    if kernel is not None:
        return route(kernel)
    if not ranges:
        return STOCK

    def rank(k: str) -> tuple[int, float]:
        return ranges[k], -sum(t for n, t in best[k].items() if 2 <= n <= ranges[k])

    chosen = max(ranges, key=rank)
    if not ranges[chosen]:  # nothing wins from two rows: a kernel may still win at one
        chosen = min(ranges, key=lambda k: best[k].get(1, float("inf")))
    return route(chosen) if route(chosen).max_rows else STOCK


def cached_route(runner, path: Path, kernel: str | None = None) -> Route:
    """`pick_route` for this machine: from `path` when it was measured before, else measured
    now (several seconds) and written there. The file records which build of the stream kernel
    was timed: it is measured again when that kernel is available now and was not timed, or
    was timed in another build; when it is not available (not built, or a non-fp32 model) its
    timings are set aside. Non-CPU models: `STOCK`, nothing measured."""
    if runner.device.type != "cpu":
        return STOCK
    available = stream_available(runner)
    current = stream_key() if available else None
    best = None
    try:
        data = json.loads(path.read_text())
        best = {arm: {int(n): float(t) for n, t in times.items()} for arm, times in data["timings"].items()}
        if data.get("format") != ROUTE_FORMAT or (available and data.get("stream") != current):
            best = None  # the stream kernel untimed, or timed in another build of it
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        best = None
    if best is None:
        best = measure_routes(runner)
        chosen = pick_route(best)
        table = ", ".join(f"{n}:" + "/".join(f"{best[a][n] * 1e3:.0f}" for a in best) for n in sorted(best["stock"]))
        log.info(
            "matmul ms by rows (%s): %s -> %s for %d..%d rows",
            "/".join(best),
            table,
            chosen.kernel,
            chosen.min_rows,
            chosen.max_rows,
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {"format": ROUTE_FORMAT, "route": chosen, "timings": best, "stream": current}
            write_atomically(path, json.dumps(data).encode())
        except OSError as exc:
            log.warning("could not cache the matmul route at %s: %s", path, exc)
    if not available:
        best.pop("stream", None)
    return pick_route(best, kernel)
