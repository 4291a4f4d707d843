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


def test_deferred_weight_gradients_left_unrun_are_an_error_not_a_silent_loss():
    """A step that ends with queued wgrad work (flushed or not) would leave its parameters
    without those gradients: check_drained names it (the executor calls it after every step)."""
    import pytest

    x = torch.randn(6, 4)
    w = torch.nn.Parameter(torch.randn(3, 4))
    for flush in (True, False):
        WeightGradStore.clear()
        with WeightGradStore.deferring():
            linear(x, w).backward(torch.randn(6, 3))
        if flush:
            WeightGradStore.flush()
        with pytest.raises(RuntimeError, match="test step: 1 deferred weight-gradient GEMMs in 1 "
                                               "unit.* never run"):
            WeightGradStore.check_drained("test step")
        WeightGradStore.check_drained("after the error the queue is empty")
    with WeightGradStore.deferring():
        linear(x, w).backward(torch.randn(6, 3))
    WeightGradStore.flush()
    WeightGradStore.pop()
    WeightGradStore.check_drained("drained")


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


def test_swiglu_function_is_bitwise_the_autograd_formula():
    """swiglu's own backward (both halves written into one gradient tensor) against autograd's
    graph of silu(gate) * up: the same values bit for bit, forward and backward, and gradcheck."""
    import torch.nn.functional as F

    from megatron_dsv3.core.mlp import swiglu

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(6, 5, 16, dtype=dtype, requires_grad=True)
        g = torch.randn(6, 5, 8, dtype=dtype)
        gate, up = h.chunk(2, dim=-1)
        ref = F.silu(gate) * up
        out = swiglu(h)
        assert torch.equal(out, ref)
        assert torch.equal(torch.autograd.grad(out, h, g)[0], torch.autograd.grad(ref, h, g)[0])
    h64 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h64,))


def test_shared_input_linear_matches_separate_linears_and_defers_weight_gradients():
    """One GEMM per pass over stacked weights: outputs, the (summed) input gradient and each
    weight's gradient against separate float64 linears; under WeightGradStore.deferring the
    weight gradients arrive only when the deferred unit runs, with the same values."""
    from megatron_dsv3.core.gemm import WeightGradStore, shared_input_linear

    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, 8, dtype=torch.float64, requires_grad=True) for n in (4, 6)]
    dy = torch.randn(5, 3, 10, dtype=torch.float64)
    out = shared_input_linear(x, ws)
    ref = torch.cat([x @ w.t() for w in ws], -1)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, [x, *ws], dy)
    want = torch.autograd.grad(ref, [x, *ws], dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    assert torch.autograd.gradcheck(lambda a, b, c: shared_input_linear(a, [b, c]),
                                    (x[:2, :1], ws[0], ws[1]))

    WeightGradStore.clear()
    with WeightGradStore.deferring():
        shared_input_linear(x, ws).backward(dy)
    assert all(w.grad is None for w in ws) and x.grad is not None
    WeightGradStore.flush()
    WeightGradStore.pop()
    for w, r in zip(ws, want[1:]):
        torch.testing.assert_close(w.grad, r)


def test_mla_stacked_down_projections_and_heads_major_layout_match_the_plain_path():
    """MLA's training path with both down-projections as one stacked GEMM and q, k, v assembled
    heads-major against the same module running them separately in sequence-major memory:
    output and every gradient."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.attention.mla import MLASelfAttention

    cfg = get_config("deepseek-v3-tiny")
    spec = get_layer_spec(cfg).submodules.self_attention
    mla = MLASelfAttention(cfg, spec.submodules, layer_number=1)
    assert mla._down_projections_stack() and mla.core_attention.heads_major_inputs
    torch.manual_seed(0)
    x = torch.randn(7, 2, cfg.hidden_size)
    results = []
    # also q, k, v laid out [s, b, n, d] in memory (what MLA builds for cores without
    # `heads_major_inputs`, e.g. Transformer Engine's) against [b, n, s, d]
    for stacked in (True, False):
        mla._stacked_down = stacked
        mla.core_attention.heads_major_inputs = stacked
        xi = x.clone().requires_grad_()
        out, _ = mla(xi)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in mla.named_parameters()}
        results.append((out.detach(), xi.grad, grads))
        mla.zero_grad(set_to_none=True)
    (o1, g1, p1), (o2, g2, p2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-5, atol=1e-6, msg=name)
