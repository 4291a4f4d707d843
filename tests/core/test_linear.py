"""Our linear layers: exact gradients, deferred weight gradients, layout-independent init."""

import torch

from megatron_dsv3.core.gemm import WeightGradStore, linear
from megatron_dsv3.core.init import init_normal_


def test_linear_function_gradcheck_float64():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, w))
    x3 = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x3, w))


def test_deferred_weight_gradients_equal_immediate_ones():
    torch.manual_seed(0)
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3, 4))
    dy = torch.randn(6, 3)
    linear(x, w).backward(dy)
    want_w, want_x = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    WeightGradStore.clear()
    with WeightGradStore.deferring():
        linear(x, w).backward(dy)
    WeightGradStore.flush()
    assert w.grad is None and torch.equal(x.grad, want_x)  # dgrad ran, wgrad waits
    assert WeightGradStore.size() == 1
    WeightGradStore.pop()
    torch.testing.assert_close(w.grad, want_w)
    assert WeightGradStore.size() == 0


def test_keyed_init_gives_every_shard_its_slice_of_the_same_tensor():
    full = torch.empty(8, 6)
    init_normal_(full, std=0.02, seed=7, key="layers.3.q")
    for rank in range(2):
        shard = torch.empty(4, 6)
        init_normal_(shard, std=0.02, seed=7, key="layers.3.q", full_shape=(8, 6), dim=0, rank=rank)
        assert torch.equal(shard, full[rank * 4:(rank + 1) * 4])
    other = torch.empty(8, 6)
    init_normal_(other, std=0.02, seed=7, key="layers.4.q")
    assert not torch.equal(other, full)
    assert abs(full.std().item() - 0.02) < 0.01


def test_rms_norm_function_matches_float64_autograd():
    from megatron_dsv3.core.norm import RMSNormFunction

    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(RMSNormFunction.apply(x, w, 1e-6), ref)


def test_rms_norm_function_float32_and_bfloat16_against_float64():
    """float32 (torch's fused forward where it exists) and bfloat16 (weight applied to the
    bfloat16-rounded normalised input, as HF and DeepSeek do): outputs and both gradients
    against float64 autograd of the same formula."""
    from megatron_dsv3.core.norm import RMSNormFunction

    torch.manual_seed(0)
    x64 = torch.randn(6, 4, 32, dtype=torch.float64) * 3
    w64 = torch.randn(32, dtype=torch.float64)
    dy64 = torch.randn(6, 4, 32, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = x64.to(dtype).requires_grad_()
        w = w64.to(dtype).requires_grad_()
        out = RMSNormFunction.apply(x, w, 1e-6)
        assert out.dtype == dtype
        xr = x.detach().double().requires_grad_()
        wr = w.detach().double().requires_grad_()
        normed = xr / torch.sqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6)
        if dtype == torch.bfloat16:  # HF: weight * normed.to(input dtype)
            normed = normed.detach().to(dtype).double() + (normed - normed.detach())
        ref = wr * normed
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        dx, dw = torch.autograd.grad(out, (x, w), dy64.to(dtype))
        rdx, rdw = torch.autograd.grad(ref, (xr, wr), dy64.to(dtype).double())
        torch.testing.assert_close(dx.double(), rdx, rtol=tol, atol=tol * 4)
        torch.testing.assert_close(dw.double(), rdw, rtol=tol, atol=tol * 4)
