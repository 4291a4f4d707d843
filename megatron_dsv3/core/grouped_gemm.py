"""Grouped GEMM over tokens sorted by expert, with autograd.

y[rows of group g] = x[rows of group g] @ w[g]^T for w [G, N, K] (each expert's weight stored like
a linear layer's [out, in]). Plain GEMMs run as torch._grouped_mm (CUDA with BF16 on SM90+; CPU
with 16-byte aligned rows: torch's kernel, or the same per-group loop of GEMMs in `_grouped_mm`
for float32 or results large enough for pooled memory), and the `Gemm`'s grouped entry points
otherwise (`grouped_fprop` / `grouped_dgrad` / `grouped_wgrad`: by default a per-group loop of
the linear layer's GEMMs, which a strategy may batch); that is how FP8 GEMMs and deferred weight
gradients apply to experts.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_dsv3 import workspace
from megatron_dsv3.core import gemm as gemm_module
from megatron_dsv3.core.gemm import DEFAULT_GEMM, Gemm, WeightGradStore, matmul_nt


def _grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # (float64 is refused there: the per-group GEMMs take it)
    if x.is_cuda and not (x.dtype == torch.bfloat16
                          and torch.cuda.get_device_capability(x.device) >= (9, 0)):
        return False
    # (rows of 16-byte multiples, on CUDA as on CPU: other strides are refused there)
    size = x.element_size()
    return all((d * size) % 16 == 0 for d in (w.shape[1], w.shape[2]))


def _offsets(counts: List[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


ONEDNN_ROW_BUCKET = 64
"""Row counts per group reach oneDNN rounded up to a multiple of this (see `_grouped_mm`)."""


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """torch._grouped_mm(a, b, offs) for a [M, K] x b [G, K, N] (rows of a grouped) or a [K, M] x
    b [M, N] (a's columns and b's rows grouped; -> [G, K, N]). On CPU it runs as torch's CPU
    kernel does, a per-group loop of GEMMs, with two changes. A result the workspace pool serves
    (large) goes into its memory: a fresh output costs a page fault per 4 KiB page. And with
    rows grouped, float32 groups take oneDNN's kernel (`matmul_nt`, much faster than torch's on
    some CPUs: docs/benchmarks.md) over a window of rows rounded up to `ONEDNN_ROW_BUCKET`: the
    group's rows and some of the next (or, at the end, the previous) group's, whose results are
    dropped. oneDNN builds a kernel per shape, ~1 ms each time a new one appears, and routing
    gives every group a new row count each step; with the rounding a few shapes recur. Groups
    of at most half a window, windows longer than `a`, and windows under `ONEDNN_MIN_FLOPS` keep
    torch's GEMM; so does a column-grouped product (a weight gradient): it sums over the
    group's rows, so it cannot take extra rows."""
    grouped_rows = b.dim() == 3
    shape = (a.shape[0], b.shape[-1]) if grouped_rows else (len(counts), a.shape[0], b.shape[-1])
    pooled = workspace.serves(shape, a.dtype, a.device)
    onednn = grouped_rows and a.device.type == "cpu" and a.dtype is torch.float32 \
        and gemm_module.ONEDNN_LINEAR is not None
    if not (pooled or onednn):
        return torch._grouped_mm(a, b, offs=_offsets(counts, a.device))
    out = workspace.empty(shape, a.dtype, a.device) if pooled else a.new_empty(shape)
    rows, start = a.shape[0], 0
    for g, n in enumerate(counts):
        if grouped_rows:
            window = -(-n // ONEDNN_ROW_BUCKET) * ONEDNN_ROW_BUCKET
            if onednn and 2 * n > window and window <= rows and \
                    2 * window * a.shape[1] * b.shape[-1] >= gemm_module.ONEDNN_MIN_FLOPS:
                first = min(start, rows - window)  # the window ends at a's last row at most
                result = matmul_nt(a[first:first + window], b[g].t())
                out[start:start + n].copy_(result[start - first:start - first + n])
            elif n:
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
