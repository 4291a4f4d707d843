"""LocalDispatcher (no expert parallelism) against a naive per-(token, choice) loop in float64:
the combined output and the gradients of the tokens, the routing weights and the expert rows."""

import pytest
import torch

from megatron_dsv3.dispatch import base
from megatron_dsv3.dispatch.base import LocalDispatcher


@pytest.mark.parametrize("sparse", [True, False], ids=["csr-combine", "gather-combine"])
def test_local_dispatch_combine_matches_naive_loop_and_its_gradients(sparse, monkeypatch):
    """Both combine paths: the CSR product (CPU float32/float64) and the gather + batched product
    (any other dtype or device)."""
    if not sparse:
        monkeypatch.setattr(base, "_sparse_combine_runs", lambda rows, weights: False)
    torch.manual_seed(0)
    T, k, E, h = 13, 3, 5, 4
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    x = torch.randn(T, h, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(E, h, dtype=torch.float64, requires_grad=True)  # "expert" e: row * scale[e]

    d = LocalDispatcher(E)
    rows, counts, state = d.dispatch(x, indices, w)
    assert counts == torch.bincount(indices.flatten(), minlength=E).tolist()
    expert_of_row = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    out = d.combine(rows * scale[expert_of_row], state)

    ref = torch.stack([sum(w[t, j] * x[t] * scale[indices[t, j]] for j in range(k))
                       for t in range(T)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    g = torch.randn(T, h, dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, w, scale), g)
    ref_grads = torch.autograd.grad(ref, (x, w, scale), g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_tokens_combine_to_an_empty_output_with_gradients(dtype):
    """A rank or micro-batch with no tokens (float32 takes the CSR combine on CPU, BF16 the
    gather path, as every dtype does on GPU): an empty [0, h] output and empty gradients."""
    E, k, h = 4, 2, 8
    x = torch.zeros(0, h, dtype=dtype, requires_grad=True)
    w = torch.zeros(0, k, dtype=dtype, requires_grad=True)
    d = LocalDispatcher(E)
    rows, counts, state = d.dispatch(x, torch.zeros(0, k, dtype=torch.long), w)
    assert counts == [0] * E
    out = d.combine(rows * 2, state)
    assert out.shape == (0, h) and out.dtype == dtype
    gx, gw = torch.autograd.grad(out, (x, w), torch.zeros(0, h, dtype=dtype))
    assert gx.shape == (0, h) and gw.shape == (0, k)


def test_an_expert_layout_the_routing_cannot_reach_is_refused():
    """Dispatchers send expert e to expert-parallel rank e // num_local_experts: another offset
    would fail later as a count mismatch or an out-of-range expert."""
    d = LocalDispatcher(8)
    d.set_expert_layout(12, 12, 0)  # e.g. redundant experts placed on the one rank
    assert (d.num_experts, d.num_local_experts, d.local_expert_offset) == (12, 12, 0)
    with pytest.raises(ValueError, match=r"local_expert_offset=4 is invalid .* allowed is .* = 0"):
        d.set_expert_layout(12, 12, 4)
    with pytest.raises(ValueError, match="num_local_experts=6 is invalid"):
        d.set_expert_layout(12, 6, 0)
