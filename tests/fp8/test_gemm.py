"""Fp8BlockwiseGemm: the three GEMMs of a linear layer (and of each routed expert) quantised as
DeepSeek-V3 does, against float64 products of the quantised-then-dequantised operands."""

import pytest
import torch

from megatron_dsv3.core.gemm import linear
from megatron_dsv3.core.grouped_gemm import grouped_linear
from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm
from megatron_dsv3.fp8.quant import (
    GRAD_AMAX_FLOOR,
    blockwise_matmul,
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
)


def q1(t, pow2=False, floor=1e-4):
    """t in 1x128 tiles along its last dim, dequantised, float64."""
    return dequantize_1x128(*quantize_1x128(t, pow2_scales=pow2, amax_floor=floor)).double()


def qb(w, pow2=False):
    """w in 128x128 blocks, dequantised, float64."""
    return dequantize_128x128(*quantize_128x128(w, pow2_scales=pow2)).double()


@pytest.mark.parametrize("pow2", [False, True])
def test_fprop_dgrad_wgrad_each_equal_their_quantised_float64_reference(pow2):
    M, N, K = 140, 72, 200  # M > 128: wgrad reduces over two token tiles, one partial
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    dy = torch.randn(M, N) * 1e-3
    y = linear(x, w, Fp8BlockwiseGemm(pow2_scales=pow2))
    y.backward(dy)
    xd, wd = x.detach(), w.detach()
    # fprop: x tiled along K, W in 128x128 blocks
    torch.testing.assert_close(y.double(), q1(xd, pow2) @ qb(wd, pow2).t(), rtol=1e-5, atol=1e-4)
    # dgrad: dy tiled along N (its last dim, the reduction dim), the same W blocks
    torch.testing.assert_close(x.grad.double(), q1(dy, pow2, GRAD_AMAX_FLOOR) @ qb(wd, pow2),
                               rtol=1e-5, atol=1e-7)
    # wgrad: dy^T and x^T tiled along M, the tokens
    torch.testing.assert_close(w.grad.double(),
                               q1(dy.t(), pow2, GRAD_AMAX_FLOOR) @ q1(xd.t(), pow2).t(),
                               rtol=1e-5, atol=1e-7)
    # and each differs from the unquantised GEMM by quantisation error only
    exact = xd.double() @ wd.double().t()
    assert 1e-3 < ((y.double() - exact).norm() / exact.norm()) < 0.06


def test_emulated_gemms_equal_blockwise_matmul_with_promotion_every_128():
    """The emulation (dequantise, one float32 GEMM) equals the per-128-block accumulation with
    FP32 promotion for all three GEMMs, up to float32 summation order."""
    M, N, K = 200, 256, 384
    x, w, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N) * 1e-4
    gemm = Fp8BlockwiseGemm()
    fprop = blockwise_matmul(*quantize_1x128(x), *quantize_128x128(w), out_dtype=torch.float32)
    torch.testing.assert_close(gemm.fprop(x, w), fprop, rtol=1e-5, atol=1e-4)
    # dgrad uses W's blocks transposed: the 128x128 blocks of W^T are W's blocks, transposed
    wq, ws = quantize_128x128(w)
    wtq, wts = quantize_128x128(w.t().contiguous())
    assert torch.equal(wtq.float(), wq.t().float()) and torch.equal(wts, ws.t())
    dgrad = blockwise_matmul(*quantize_1x128(dy, amax_floor=GRAD_AMAX_FLOOR), wtq, wts,
                             out_dtype=torch.float32)
    torch.testing.assert_close(gemm.dgrad(dy, w), dgrad, rtol=1e-5, atol=1e-8)
    # wgrad: both operands in 1x128 tiles along the tokens (DeepGEMM's 1D x 1D)
    wgrad = blockwise_matmul(*quantize_1x128(dy.t(), amax_floor=GRAD_AMAX_FLOOR),
                             *quantize_1x128(x.t()), out_dtype=torch.float32)
    torch.testing.assert_close(gemm.wgrad(dy, x), wgrad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("magnitude", [1e-7, 1e-10])
def test_tiny_gradients_keep_their_precision(magnitude):
    """Gradients far below the activation amax floor of 1e-4 keep E4M3's relative precision in
    dgrad and wgrad (the gradients' own floor is 1e-30): with the activation floor a 1e-10
    gradient would keep about 5% of its value."""
    dy = torch.randn(8, 256) * magnitude
    w = torch.randn(256, 128)
    x = torch.randn(8, 128)
    gemm = Fp8BlockwiseGemm()
    for got, exact in ((gemm.dgrad(dy, w), dy.double() @ w.double()),
                       (gemm.wgrad(dy, x), dy.double().t() @ x.double())):
        assert ((got.double() - exact).norm() / exact.norm()) < 0.06


def test_bf16_inputs_give_bf16_outputs_of_the_same_quantised_product():
    x, w = torch.randn(16, 256).bfloat16(), torch.randn(64, 256).bfloat16()
    y = Fp8BlockwiseGemm().fprop(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), q1(x) @ qb(w).t(), rtol=2 ** -8, atol=1e-2)


def test_routed_experts_run_each_group_through_the_fp8_gemms():
    """grouped_linear with the FP8 strategy (the routed experts' path): per expert, forward and
    both gradients equal the quantised float64 reference; an expert without tokens gets a zero
    weight gradient."""
    counts, N, K = [130, 0, 7], 72, 200
    x = torch.randn(sum(counts), K, requires_grad=True)
    w = torch.randn(len(counts), N, K, requires_grad=True)
    dy = torch.randn(sum(counts), N) * 1e-3
    y = grouped_linear(x, w, counts, Fp8BlockwiseGemm())
    y.backward(dy)
    start = 0
    for g, n in enumerate(counts):
        rows = slice(start, start + n)
        start += n
        if n == 0:
            assert torch.equal(w.grad[g], torch.zeros_like(w[g]))
            continue
        xg, wg, dyg = x.detach()[rows], w.detach()[g], dy[rows]
        torch.testing.assert_close(y[rows].double(), q1(xg) @ qb(wg).t(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(x.grad[rows].double(), q1(dyg, floor=GRAD_AMAX_FLOOR) @ qb(wg),
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w.grad[g].double(),
                                   q1(dyg.t(), floor=GRAD_AMAX_FLOOR) @ q1(xg.t()).t(),
                                   rtol=1e-5, atol=1e-7)
