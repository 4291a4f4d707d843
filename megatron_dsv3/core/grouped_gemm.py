"""Grouped GEMM over tokens sorted by expert, with autograd.

y[rows of group g] = x[rows of group g] @ w[g]^T for w [G, N, K] (each expert's weight stored like
a linear layer's [out, in]). Uses torch._grouped_mm where it runs (CPU with 16-byte aligned rows;
CUDA with BF16 on SM90+) for plain GEMMs, and the `Gemm`'s grouped entry points otherwise
(`grouped_fprop` / `grouped_dgrad` / `grouped_wgrad`: by default a per-group loop of the linear
layer's GEMMs, which a strategy may batch); that is how FP8 GEMMs and deferred weight gradients
apply to experts.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_dsv3 import workspace
from megatron_dsv3.core.gemm import DEFAULT_GEMM, Gemm, WeightGradStore


def _grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    size = x.element_size()
    return all((d * size) % 16 == 0 for d in (w.shape[1], w.shape[2]))


def _offsets(counts: List[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """torch._grouped_mm(a, b, offs) for a [M, K] x b [G, K, N] (rows of a grouped) or a [K, M] x
    b [M, N] (a's columns and b's rows grouped; -> [G, K, N]). A result the workspace pool serves
    (large, on CPU) goes into its memory: torch's CPU kernel is this same per-group loop of GEMMs,
    but its fresh output costs a page fault per 4 KiB page."""
    grouped_rows = b.dim() == 3
    shape = (a.shape[0], b.shape[-1]) if grouped_rows else (len(counts), a.shape[0], b.shape[-1])
    if not workspace.serves(shape, a.dtype, a.device):
        return torch._grouped_mm(a, b, offs=_offsets(counts, a.device))
    out = workspace.empty(shape, a.dtype, a.device)
    start = 0
    for g, n in enumerate(counts):
        if grouped_rows:
            if n:
                torch.mm(a[start:start + n], b[g], out=out[start:start + n])
        elif n:
            torch.mm(a[:, start:start + n], b[start:start + n], out=out[g])
        else:
            out[g].zero_()
        start += n
    return out


class GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts: List[int], gemm: Gemm):
        ctx.save_for_backward(x, w)
        ctx.counts, ctx.gemm = counts, gemm
        ctx.fast = gemm is DEFAULT_GEMM and _grouped_mm_usable(x, w)
        if ctx.fast:
            return _grouped_mm(x, w.transpose(-2, -1), counts)
        return gemm.grouped_fprop(x, w, counts)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        counts, gemm = ctx.counts, ctx.gemm
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if ctx.fast:
                dx = _grouped_mm(dy, w, counts)
            else:
                dx = gemm.grouped_dgrad(dy, w, counts)

        def weight_grad():
            if ctx.fast:
                return _grouped_mm(dy.t(), x, counts)
            return gemm.grouped_wgrad(dy, x, counts, w)

        if ctx.needs_input_grad[1]:
            if WeightGradStore.is_deferring():
                dw = WeightGradStore.defer(w, weight_grad)
            else:
                dw = weight_grad()
        return dx, dw, None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: List[int],
                   gemm: Optional[Gemm] = None) -> torch.Tensor:
    """x [sum(counts), K] sorted by group, w [G, N, K] -> [sum(counts), N]."""
    if len(counts) != w.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_linear: counts {counts} do not match x rows {x.shape[0]} and "
                         f"{w.shape[0]} groups")
    return GroupedLinearFunction.apply(x, w, list(counts), gemm or DEFAULT_GEMM)
