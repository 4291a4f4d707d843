"""Grouped GEMM: torch._grouped_mm fast path and the per-group loop agree with float64 matmuls."""

import pytest
import torch

from megatron_dsv3.core.gemm import Gemm
from megatron_dsv3.core.grouped_gemm import grouped_linear


class LoopGemm(Gemm):
    """The default arithmetic forced through the per-group loop (not torch._grouped_mm)."""


@pytest.mark.parametrize("counts", [[3, 0, 5, 8], [0, 0, 16, 0], [4, 4, 4, 4]])
def test_fast_path_and_loop_match_float64_reference(counts):
    torch.manual_seed(0)
    G, K, N = len(counts), 16, 8
    x = torch.randn(sum(counts), K, requires_grad=True)
    w = torch.randn(G, N, K, requires_grad=True)
    dy = torch.randn(sum(counts), N)
    results = []
    for gemm in (None, LoopGemm()):
        x.grad = w.grad = None
        y = grouped_linear(x, w, counts, gemm)
        y.backward(dy)
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    xd, wd = x.detach().double(), w.detach().double()
    rows = torch.split(xd, counts)
    ref_y = torch.cat([r @ wd[g].t() for g, r in enumerate(rows)])
    ref_dx = torch.cat([d @ wd[g] for g, d in enumerate(torch.split(dy.double(), counts))])
    ref_dw = torch.stack([d.t() @ r for d, r in zip(torch.split(dy.double(), counts), rows)])
    for y, dx, dw in results:
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-5, atol=1e-5)
        assert dw[[g for g, c in enumerate(counts) if c == 0]].abs().sum() == 0


def test_grouped_linear_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, [2, 0, 5], LoopGemm()), (x, w))


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="counts"):
        grouped_linear(torch.randn(5, 4), torch.randn(2, 3, 4), [2, 2])
