"""The CPU skinny matmul: same products as F.linear, switched in and out in place."""

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


def test_pick_max_rows_takes_the_longest_run_of_clear_wins_from_two_rows():
    stock = {1: 1.0, 2: 2.0, 3: 2.0, 4: 2.0, 6: 2.0, 8: 2.0, 12: 2.0}
    # EPYC-like: skinny about one step up to 8 rows, a tie at 12
    assert matmul.pick_max_rows(stock, {1: 1.0, 2: 1.0, 3: 1.1, 4: 1.1, 6: 1.2, 8: 1.3, 12: 2.0}) == 8
    # Xeon-like: stock wins at 2 rows, so a later win does not count
    assert matmul.pick_max_rows(stock, {1: 1.0, 2: 2.1, 3: 1.0, 4: 1.0, 6: 1.0, 8: 1.0, 12: 1.0}) == 0
    # a 4 % edge is within the margin: not a win
    assert matmul.pick_max_rows(stock, {n: 0.96 * s for n, s in stock.items()}) == 0
    assert matmul.pick_max_rows(stock, {n: 0.90 * s for n, s in stock.items()}) == 12
    # a loss in the middle ends the range there
    assert matmul.pick_max_rows(stock, {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.5, 6: 1.0, 8: 1.0, 12: 1.0}) == 3
