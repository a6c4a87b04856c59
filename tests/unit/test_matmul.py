"""The CPU few-row matmul kernels: same products as F.linear, switched in and out in place."""

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
@pytest.mark.parametrize("shape", [(2, 576), (3, 37), (8, 576), (9, 24), (17, 1536), (3, 4, 576), (1, 7, 16)])
def test_stream_kernel_equals_f_linear(stream_kernel, shape, bias):
    torch.manual_seed(1)
    layer = nn.Linear(shape[-1], 131, bias=bias)  # 131 features: a remainder after every block size
    x = torch.randn(*shape)
    expected = F.linear(x, layer.weight, layer.bias)
    matmul.install(layer, max_rows=32, kernel="stream")
    out = layer(x)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_stream_kernel_rows_do_not_depend_on_their_neighbours(stream_kernel):
    """Each row's result is bit for bit the same alone or among others (any group split)."""
    torch.manual_seed(2)
    w = torch.randn(200, 576)
    x = torch.randn(20, 576)
    together = stream_kernel.stream_linear(x, w, None)
    for r in range(20):
        assert torch.equal(stream_kernel.stream_linear(x[r : r + 1], w, None), together[r : r + 1])
    assert torch.equal(stream_kernel.stream_linear(x[3:12], w, None), together[3:12])
    # a non-contiguous input gives the same values as its contiguous copy
    wide = torch.randn(20, 2 * 576)[:, ::2]
    assert torch.equal(
        stream_kernel.stream_linear(wide, w, None), stream_kernel.stream_linear(wide.contiguous(), w, None)
    )


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
    assert matmul.pick_route(best) == ("stream", 32)
    assert matmul.pick_route(best, kernel="skinny") == ("skinny", 0)
    assert matmul.pick_route({"stock": stock, "skinny": skinny}) == ("skinny", 0)  # nothing wins: stock
    # equal ranges: the faster kernel over that range
    faster = {n: 0.9 * t for n, t in stream.items()}
    assert matmul.pick_route({"stock": stock, "skinny": stream, "stream": faster}) == ("stream", 32)
    assert matmul.pick_route({"stock": stock, "skinny": faster, "stream": stream}) == ("skinny", 32)
