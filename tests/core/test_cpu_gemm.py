"""Our linear layers' float32 CPU GEMMs on oneDNN's kernel (`gemm.matmul_nt`): the float64
product within float32 rounding for all three passes, and torch's own GEMM wherever oneDNN does
not apply (small GEMMs, other dtypes, inputs autograd tracks, MEGATRON_DSV3_CPU_GEMM=torch)."""

import pytest
import torch

from megatron_dsv3.core import gemm

pytestmark = pytest.mark.skipif(gemm.ONEDNN_LINEAR is None,
                                reason="this torch has no oneDNN linear kernel")


@pytest.fixture
def spy(monkeypatch):
    calls = []
    kernel = gemm.ONEDNN_LINEAR
    monkeypatch.setattr(gemm, "ONEDNN_LINEAR", lambda *a: calls.append(a[0].shape) or kernel(*a))
    return calls


def test_the_three_passes_of_a_linear_layer_equal_the_float64_products(spy):
    """A [96, 80] x [80, 72]^T layer (1.1 MFLOP, above a lowered threshold), its input gradient
    and weight gradient through LinearFunction: oneDNN ran each GEMM, and each result is the
    float64 product within float32 accumulation error; strided operands (w^T, dy^T, x^T) are
    read as they are."""
    torch.manual_seed(0)
    old = gemm.ONEDNN_MIN_FLOPS
    gemm.ONEDNN_MIN_FLOPS = 1 << 20
    try:
        x = torch.randn(4, 24, 80, requires_grad=True)
        w = torch.randn(72, 80, requires_grad=True)
        y = gemm.linear(x, w)
        dy = torch.randn_like(y)
        y.backward(dy)
    finally:
        gemm.ONEDNN_MIN_FLOPS = old
    assert len(spy) == 3
    xd, wd = x.detach().double().reshape(-1, 80), w.detach().double()
    dyd = dy.double().reshape(-1, 72)
    for got, want in ((y.reshape(-1, 72), xd @ wd.t()), (x.grad.reshape(-1, 80), dyd @ wd),
                      (w.grad, dyd.t() @ xd)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_torch_gemm_where_onednn_does_not_apply(spy, monkeypatch):
    """Below ONEDNN_MIN_FLOPS, float64, bfloat16 and inputs that autograd tracks (oneDNN's call
    has no derivative: their gradient would be lost) take torch's GEMM, bit for bit `a @ b.t()`;
    the environment switch turns the kernel off at import."""
    torch.manual_seed(0)
    small = torch.randn(8, 16), torch.randn(4, 16)
    big64 = torch.randn(256, 256, dtype=torch.float64), torch.randn(256, 256, dtype=torch.float64)
    big16 = tuple(t.to(torch.bfloat16) for t in big64)
    for a, b in (small, big64, big16):
        assert torch.equal(gemm.matmul_nt(a, b), a @ b.t())
    tracked = torch.randn(256, 256, requires_grad=True)
    out = gemm.matmul_nt(tracked, torch.randn(256, 256))
    assert out.grad_fn is not None and spy == []
    with torch.no_grad():
        gemm.matmul_nt(tracked, torch.randn(256, 256))
    assert len(spy) == 1  # the same GEMM untracked: oneDNN
    monkeypatch.setenv("MEGATRON_DSV3_CPU_GEMM", "torch")
    assert gemm._onednn_linear() is None
    monkeypatch.setenv("MEGATRON_DSV3_CPU_GEMM", "auto")
    assert gemm._onednn_linear() is not None
    monkeypatch.setenv("MEGATRON_DSV3_CPU_GEMM", "off")
    with pytest.raises(ValueError, match="MEGATRON_DSV3_CPU_GEMM='off': allowed values are 'auto'"):
        gemm._onednn_linear()


def test_deferred_weight_gradients_equal_immediate_ones(spy):
    """A weight gradient deferred under WeightGradStore (zero-bubble schedules) runs later, where
    grad mode is on: it must run untracked, on the same kernel, and equal the immediate one bit
    for bit (it took torch's GEMM through the tracked saved input, 7.6e-5 apart)."""
    torch.manual_seed(0)
    x = torch.randn(512, 256, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(256, 256))
    dy = torch.randn(512, 256)
    gemm.linear(x, w).backward(dy)
    immediate, calls = w.grad.clone(), len(spy)
    w.grad = None
    with gemm.WeightGradStore.deferring():
        gemm.linear(x, w).backward(dy)
    gemm.WeightGradStore.flush()
    gemm.WeightGradStore.pop()
    assert len(spy) == 2 * calls and torch.equal(w.grad, immediate)
