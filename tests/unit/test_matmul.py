"""The CPU few-row matmul kernels: same products as F.linear, switched in and out in place."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trieserve.server import matmul


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (5, 24), (9, 24), (10, 24), (3, 4, 24), (1, 7, 24), (0, 24)])
def test_skinny_linear_equals_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    expected = F.linear(x, layer.weight, layer.bias)
    matmul.install(layer, max_rows=9)
    assert type(layer) is matmul.SkinnyLinear
    out = layer(x)
    assert out.shape == expected.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_install_switches_only_plain_linears_and_keeps_tied_weights():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight  # tied, as in SmolLM2

    model = Tiny()
    assert matmul.install(model, max_rows=4) == 2
    assert type(model.proj) is matmul.SkinnyLinear and model.head.max_rows == 4
    assert model.head.weight is model.embed.weight
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.head(x), x @ model.embed.weight.T, atol=1e-5, rtol=1e-5)
    assert matmul.install(model, max_rows=6) == 2  # already switched: the limit is updated
    assert model.proj.max_rows == 6
    assert matmul.uninstall(model) == 2
    assert type(model.proj) is nn.Linear and type(model.head) is nn.Linear


def test_install_leaves_non_cpu_models_and_zero_rows_alone():
    model = nn.Sequential(nn.Linear(4, 4))
    assert matmul.install(model, max_rows=0) == 0
    assert matmul.install(model, max_rows=1) == 0
    assert type(model[0]) is nn.Linear
    meta = nn.Sequential(nn.Linear(4, 4, device="meta"))
    assert matmul.install(meta) == 0
    assert type(meta[0]) is nn.Linear


def test_rows_in_range_take_the_skinny_route_and_others_f_linear(monkeypatch):
    """The route itself, not only the result: 2..max_rows rows never reach F.linear."""
    layer = nn.Linear(24, 40)
    matmul.install(layer, max_rows=9)
    calls = []
    real = matmul.F.linear
    monkeypatch.setattr(matmul.F, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    layer(torch.randn(2, 24))
    layer(torch.randn(3, 3, 24))
    assert calls == []
    layer(torch.randn(1, 24))
    layer(torch.randn(10, 24))
    assert calls == [torch.Size([1, 24]), torch.Size([10, 24])]
    # a route from one row: a plain decode step takes the kernel too
    assert matmul.install(layer, max_rows=9, min_rows=1) == 1 and layer.min_rows == 1
    layer(torch.randn(1, 24))
    layer(torch.randn(1, 1, 24))
    assert calls == [torch.Size([1, 24]), torch.Size([10, 24])]
    with pytest.raises(ValueError, match="min_rows"):
        matmul.install(layer, max_rows=9, min_rows=0)


def test_pick_max_rows_takes_the_last_clear_win_before_a_clear_loss():
    stock = {1: 1.0, 2: 2.0, 3: 2.0, 4: 2.0, 6: 2.0, 8: 2.0, 12: 2.0}
    # EPYC-like: skinny about one step up to 8 rows, a tie at 12
    assert matmul.pick_max_rows(stock, {1: 1.0, 2: 1.0, 3: 1.1, 4: 1.1, 6: 1.2, 8: 1.3, 12: 2.0}) == 8
    # Xeon-like for skinny: stock wins clearly at 2 rows, so a later win does not count
    assert matmul.pick_max_rows(stock, {1: 1.0, 2: 2.5, 3: 1.0, 4: 1.0, 6: 1.0, 8: 1.0, 12: 1.0}) == 0
    # a tie at 2-3 rows (stock's matrix-vector kernel at its best) does not hide the wins above
    assert matmul.pick_max_rows(stock, {1: 1.0, 2: 2.0, 3: 2.05, 4: 1.0, 6: 1.2, 8: 1.5, 12: 2.0}) == 8
    # a 4 % edge is within the margin: not a win
    assert matmul.pick_max_rows(stock, {n: 0.96 * s for n, s in stock.items()}) == 0
    assert matmul.pick_max_rows(stock, {n: 0.90 * s for n, s in stock.items()}) == 12
    # a loss in the middle ends the range there
    assert matmul.pick_max_rows(stock, {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.5, 6: 1.0, 8: 1.0, 12: 1.0}) == 3


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 576), (1, 1, 37), (2, 576), (3, 37), (8, 576), (9, 24), (17, 1536), (3, 4, 576), (1, 7, 16)]
)
def test_stream_kernel_equals_f_linear(stream_kernel, shape, bias):
    torch.manual_seed(1)
    layer = nn.Linear(shape[-1], 131, bias=bias)  # 131 features: a remainder after every block size
    x = torch.randn(*shape)
    expected = F.linear(x, layer.weight, layer.bias)
    matmul.install(layer, max_rows=32, kernel="stream", min_rows=1)
    out = layer(x)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_stream_kernel_rows_do_not_depend_on_their_neighbours(stream_kernel):
    """Each row's result is bit for bit the same alone or among others, for every row count
    (every group split) and with K and N leaving tails (577 = 36 * 16 + 1; 131 features)."""
    torch.manual_seed(2)
    w = torch.randn(131, 577)
    x = torch.randn(20, 577)
    together = stream_kernel.stream_linear(x, w, None)
    for n in range(1, 21):
        assert torch.equal(stream_kernel.stream_linear(x[:n], w, None), together[:n]), f"{n} rows"
    for r in range(20):
        assert torch.equal(stream_kernel.stream_linear(x[r : r + 1], w, None), together[r : r + 1])
    assert torch.equal(stream_kernel.stream_linear(x[3:12], w, None), together[3:12])
    # a non-contiguous input gives the same values as its contiguous copy
    wide = torch.randn(20, 2 * 577)[:, ::2]
    assert torch.equal(
        stream_kernel.stream_linear(wide, w, None), stream_kernel.stream_linear(wide.contiguous(), w, None)
    )
    with pytest.raises(RuntimeError, match="one value per output feature"):
        stream_kernel.stream_linear(x, w, torch.zeros(1))


def test_stream_kernel_takes_the_route_and_rejects_what_it_cannot_run(stream_kernel, monkeypatch):
    with pytest.raises(RuntimeError, match="fp32 only"):
        stream_kernel.stream_linear(
            torch.randn(2, 8, dtype=torch.float16), torch.randn(4, 8, dtype=torch.float16), None
        )
    layer = nn.Linear(24, 40)
    matmul.install(layer, max_rows=8, kernel="stream")
    calls = []
    monkeypatch.setattr(stream_kernel, "stream_linear", lambda *a: calls.append(a[0].shape) or F.linear(*a))
    layer(torch.randn(5, 24))
    layer(torch.randn(1, 24))  # one row: F.linear's matrix-vector kernel
    layer(torch.randn(9, 24))  # past the range
    assert calls == [torch.Size([5, 24])]
    with pytest.raises(ValueError, match="unknown matmul kernel"):
        matmul.install(layer, max_rows=8, kernel="fast")


def test_pick_route_takes_the_kernel_with_the_longer_range():
    stock = {1: 1.0, 2: 1.0, 3: 1.1, 4: 1.6, 8: 2.0, 16: 2.2, 32: 2.7}
    skinny = {1: 1.0, 2: 2.1, 3: 2.2, 4: 2.2, 8: 2.3, 16: 2.3, 32: 2.9}  # Xeon-like: never
    stream = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.05, 8: 1.2, 16: 1.7, 32: 2.5}
    best = {"stock": stock, "skinny": skinny, "stream": stream}
    assert matmul.pick_route(best) == ("stream", 32, 2)
    assert matmul.pick_route(best, kernel="skinny") == ("skinny", 0, 2)
    assert matmul.pick_route({"stock": stock, "skinny": skinny}) == matmul.STOCK  # nothing wins: stock
    # equal ranges: the faster kernel over that range (and at one row, the faster one takes it)
    faster = {n: 0.9 * t for n, t in stream.items()}
    assert matmul.pick_route({"stock": stock, "skinny": stream, "stream": faster}) == ("stream", 32, 1)
    assert matmul.pick_route({"stock": stock, "skinny": faster, "stream": stream}) == ("skinny", 32, 1)


def test_pick_route_takes_one_row_only_on_a_clear_win():
    """A plain decode step is one row: the kernel takes it where stock's matrix-vector kernel is
    clearly slower (AVX2 EPYC: 10.3 against 5.3 ms for the output head), not on a tie (Xeon)."""
    stock = {1: 1.5, 2: 2.0, 4: 2.2, 8: 2.6}
    stream = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5}
    assert matmul.pick_route({"stock": stock, "stream": stream}) == ("stream", 8, 1)
    tie = {**stream, 1: 0.97 * stock[1]}
    assert matmul.pick_route({"stock": stock, "stream": tie}) == ("stream", 8, 2)
    # a kernel that wins only at one row: 1..1
    slow = {1: 1.0, 2: 3.0, 4: 3.0, 8: 3.0}
    assert matmul.pick_route({"stock": stock, "stream": slow}) == ("stream", 1, 1)
    assert matmul.pick_route({"stock": stock, "stream": slow}, kernel="stream") == ("stream", 1, 1)


def test_a_failed_build_leaves_the_kernel_off_with_the_reason_logged(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*_a, **_k):
        raise RuntimeError("Error building extension 'x'\nc++: command not found")

    monkeypatch.setattr(matmul, "_stream", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level("WARNING", logger=matmul.log.name):
        assert matmul.load_stream(tmp_path) is None
    assert "c++: command not found" in caplog.text
    assert not matmul.stream_available()
    with pytest.raises(RuntimeError, match="not built"):
        matmul.install(nn.Linear(4, 4), max_rows=8, kernel="stream")


def test_the_build_uses_its_own_source_copy_and_clears_a_stale_lock(tmp_path, monkeypatch):
    """A build killed half-way leaves torch's lock file; the next start must not wait on it forever."""
    import os
    import time

    from torch.utils import cpp_extension

    seen = {}

    def fake_load(name, sources, **kwargs):
        seen.update(name=name, sources=sources, lock=(Path(kwargs["build_directory"]) / "lock").exists())
        return "built"

    monkeypatch.setattr(matmul, "_stream", None)
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    directory = tmp_path / f"stream-{matmul.stream_key()}"
    directory.mkdir()
    (directory / "lock").touch()
    old = time.time() - 2 * matmul.STALE_LOCK_S
    os.utime(directory / "lock", (old, old))
    assert matmul.load_stream(tmp_path) == "built"
    assert seen["sources"] == [str(directory / "stream_linear.cpp")] and not seen["lock"]
    assert (directory / "stream_linear.cpp").read_bytes() == matmul.SOURCE.read_bytes()
    # a fresh lock (another process building right now) is left alone
    monkeypatch.setattr(matmul, "_stream", None)
    (directory / "lock").touch()
    matmul.load_stream(tmp_path)
    assert seen["lock"]


def test_a_build_prunes_other_keys_builds_left_unused(tmp_path, monkeypatch):
    import os
    import time

    from torch.utils import cpp_extension

    monkeypatch.setattr(matmul, "_stream", None)
    monkeypatch.setattr(cpp_extension, "load", lambda *_a, **_k: "built")
    stale, recent = tmp_path / "stream-0ld0ld0ld0ld", tmp_path / "stream-0therc0py00"
    other = tmp_path / "models"  # not a kernel build: never touched
    for d in (stale, recent, other):
        (d / "sub").mkdir(parents=True)
    old = time.time() - 2 * matmul.UNUSED_BUILD_S
    for d in (stale, other):
        os.utime(d, (old, old))
    current = tmp_path / f"stream-{matmul.stream_key()}"
    current.mkdir()
    os.utime(current, (old, old))  # in use: loading it marks it fresh
    assert matmul.load_stream(tmp_path) == "built"
    assert not stale.exists() and recent.exists() and other.exists() and current.exists()
    assert time.time() - current.stat().st_mtime < 60


TIMINGS = {
    "stock": {1: 1.0, 2: 1.0, 4: 1.6, 8: 2.0},
    "skinny": {1: 1.0, 2: 0.9, 4: 1.2, 8: 1.5},
    "stream": {1: 1.0, 2: 0.9, 4: 1.0, 8: 1.1},
}


def _cpu_runner(dtype=torch.float32):
    return SimpleNamespace(device=torch.device("cpu"), model=nn.Linear(2, 2).to(dtype))


def test_cached_route_sets_stream_timings_aside_when_the_kernel_is_not_available(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        matmul, "measure_routes", lambda runner: calls.append(1) or {k: dict(v) for k, v in TIMINGS.items()}
    )
    path = tmp_path / "route.json"
    monkeypatch.setattr(matmul, "_stream", None)
    old = {"route": ["stream", 8], "timings": TIMINGS, "stream": "another-build"}
    path.write_text(json.dumps(dict(old, format=matmul.ROUTE_FORMAT)))
    assert matmul.cached_route(_cpu_runner(), path) == ("skinny", 8, 2) and calls == []
    # available now: a file that timed another build of the kernel is measured again
    monkeypatch.setattr(matmul, "_stream", object())
    monkeypatch.setattr(matmul, "stream_key", lambda: "this-build")
    assert matmul.cached_route(_cpu_runner(), path) == ("stream", 8, 2) and calls == [1]
    assert json.loads(path.read_text())["stream"] == "this-build"
    assert matmul.cached_route(_cpu_runner(), path) == ("stream", 8, 2) and calls == [1]
    # a model the kernel cannot run (bf16) reads the same file without it
    assert matmul.cached_route(_cpu_runner(torch.bfloat16), path) == ("skinny", 8, 2) and calls == [1]
    # a file of the first format never timed the kernels at one row: measured again
    monkeypatch.setattr(matmul, "stream_key", lambda: "another-build")
    path.write_text(json.dumps(old))
    assert matmul.cached_route(_cpu_runner(), path) == ("stream", 8, 2) and calls == [1, 1]


def test_matmul_route_respects_the_flags_before_building_anything(tmp_path, monkeypatch):
    from trieserve.server.builder import matmul_route
    from trieserve.server.settings import Settings

    monkeypatch.setattr(matmul, "load_stream", lambda *_a: pytest.fail("built the kernel"))
    off = Settings(skinny_rows=0, cache_dir=tmp_path)
    assert matmul_route(off, _cpu_runner(), "m") == matmul.STOCK
    with pytest.raises(ValueError, match="float32 models only"):
        matmul_route(Settings(matmul_kernel="stream", dtype="bfloat16", cache_dir=tmp_path), _cpu_runner(), "m")
    forced = Settings(matmul_kernel="skinny", skinny_rows=6, cache_dir=tmp_path)
    assert matmul_route(forced, _cpu_runner(), "m") == ("skinny", 6, 2)
    gpu = SimpleNamespace(device=torch.device("cuda"), model=None)
    assert matmul_route(Settings(cache_dir=tmp_path), gpu, "m") == matmul.STOCK
