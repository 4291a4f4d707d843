"""DeepSeek-V3's FP8 GEMMs on torch's blockwise-scaled `F.scaled_mm` (the 'torch' GEMM backend).

The operands are quantised by our own quantisers (`fp8.quant`, bit-exact with DeepSeek's
kernels), so the E4M3 codes and scales are exactly those of the emulation (`fp8.gemm`); only
the scales' storage changes, into the layout torch's kernel reads:

    fprop  y  = x  W^T   a = x  [M, K]      1x128      b = W   [N, K]   128x128
    dgrad  dx = dy W     a = dy [M, N]      1x128      b = W^T [K, N]   128x128 (W's blocks,
                                                                          transposed)
    wgrad  dW = dy^T x   a = dy^T [N, M]    1x128      b = x^T [K, M]   1x128  (both tiled
                                                        along the tokens, as DeepGEMM pairs them)

`F.scaled_mm(mat_a, mat_b, ...)` computes mat_a @ mat_b with mat_a = a [rows, k] row-major and
mat_b = b^T [k, cols] column-major. The layouts below are those of torch 2.13's checks: the
meta kernel `_check_scaled_mm_sizes_v2` (torch/_meta_registrations.py, which runs on CPU with
meta tensors: tests/fp8/test_torch_gemm.py calls it) and the CUDA implementation's checks
(aten/src/ATen/native/cuda/ScaledBlas.cpp, `_scaled_block1x128_block128x128` and
`_scaled_block1x128_block1x128`, read through the public source):

- 1x128 operand a [R, K]: scale_a of shape [R, ceil(K/128)] with strides (1, R): each K block's
  R scales are contiguous ("outer-dim-major"), scale (r, j) at storage offset r + j * R;
- 128x128 operand (mat_b [K, N]): scale_b of shape [L4, ceil(N/128)] with strides (1, L4),
  L4 = ceil(K/128) rounded up to a multiple of 4: block (j, n) at storage offset j + n * L4 (the
  K blocks of one N block contiguous, padded to 4 entries);
- 1x128 operand b [C, K] (wgrad): scale_b [C, ceil(K/128)], strides (1, C), scale (c, j) at
  offset c + j * C.

Padding (zero codes add nothing to any sum, so the product is unchanged):
- K to a multiple of 128 in both operands: the meta check wants K // 128 scale columns, the CUDA
  check ceil(K/128); they agree once K is a multiple of 128 (both need K % 16 == 0 anyway);
- N of a 128x128 operand to a multiple of 128 (same disagreement: N // 128 vs ceil(N/128)); N
  of a 1x128 operand b to a multiple of 16 (mat_b's dimensions must be multiples of 16);
- the rows of each 1x128 operand to a multiple of 4, so every K block's column of scales starts
  16-byte aligned (Transformer Engine pads its column-wise scale-inverses the same way);
the output is cut back to [M, N].

The kernel runs on CUDA SM 9.x only (torch checks `major == 9`); `fp8.backends` decides whether
it can run. On CPU `reference_scaled_mm` reads the prepared arguments back the way the layout
says (from raw storage offsets, not through the tensors' strides) and multiplies the dequantised
operands: injected as `mm`, TorchBlockwiseGemm then equals the emulation exactly, which is how the
layout transforms are tested without a GPU.

Routed experts: torch's grouped `F.scaled_grouped_mm` has no blockwise recipe in torch <= 2.13
(its CUDA dispatch table lists row-wise, MXFP8, MXFP4 and NVFP4 only; newer builds add a
cuBLASLt grouped path with a different, packed scale layout), so each expert runs one
`F.scaled_mm`; the weights of all experts are quantised in one call when their blocks do not
straddle experts (N a multiple of 128), activations in one call for all rows (1x128 tiles never
cross rows). Token counts are host integers already (the dispatcher's), so the loop adds no
host synchronisation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional

import torch

from megatron_dsv3.core.gemm import Gemm
from megatron_dsv3.fp8.quant import (
    AMAX_FLOOR,
    BLOCK,
    GRAD_AMAX_FLOOR,
    quantize_1x128,
    quantize_128x128,
)

ROW_ALIGN = 4  # rows of a 1x128 operand: 16-byte aligned float32 scale columns
COL_ALIGN = 16  # mat_b's dimensions (torch's check)
TILES, BLOCKS = "1x128", "128x128"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """t [r, c] padded at the end to [rows, cols] (t itself when nothing is missing)."""
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t
    if t.dtype == torch.float8_e4m3fn:  # pad the bytes: the zero byte is E4M3 +0
        return torch.nn.functional.pad(t.view(torch.uint8), (0, cols - c, 0, rows - r)
                                       ).view(torch.float8_e4m3fn)
    return torch.nn.functional.pad(t, (0, cols - c, 0, rows - r), value=value)


@dataclasses.dataclass
class ScaledMmArgs:
    """Everything one F.scaled_mm call receives, in the kernel's layouts, and the [M, N] block of
    its output that holds the product."""

    mat_a: torch.Tensor  # [Mp, Kp] E4M3, row-major
    mat_b: torch.Tensor  # [Kp, Np] E4M3, column-major
    scale_a: torch.Tensor  # float32, see the module docstring
    recipe_a: str  # "1x128"
    scale_b: torch.Tensor
    recipe_b: str  # "128x128" or "1x128"
    M: int
    N: int
    K: int


def outer_major(scale: torch.Tensor) -> torch.Tensor:
    """[R, kb] scales -> the same values with strides (1, R): each column contiguous, in a fresh
    allocation (a view already laid out so, e.g. one expert's rows of a grouped call, could start
    at an offset that is no 16-byte multiple)."""
    R, kb = scale.shape
    out = torch.empty_strided((R, kb), (1, max(R, 1)), dtype=scale.dtype, device=scale.device)
    return out.copy_(scale)


def prepare(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
            b_kind: str) -> ScaledMmArgs:
    """The F.scaled_mm arguments for a @ b^T: a [M, K] E4M3 in 1x128 tiles (a_s [M, ceil(K/128)]),
    b [N, K] E4M3 in 128x128 blocks (b_kind '128x128', b_s [ceil(N/128), ceil(K/128)]) or in
    1x128 tiles (b_kind '1x128', b_s [N, ceil(K/128)])."""
    M, K = a_q.shape
    N, K2 = b_q.shape
    kb = math.ceil(K / BLOCK)
    if K2 != K or tuple(a_s.shape) != (M, kb):
        raise ValueError(f"prepare: a {tuple(a_q.shape)} / a_s {tuple(a_s.shape)} do not match "
                         f"b {tuple(b_q.shape)} in 1x128 tiles")
    Kp, Mp = kb * BLOCK, _round_up(max(M, 1), ROW_ALIGN)
    mat_a = _pad(a_q, Mp, Kp).contiguous()
    scale_a = outer_major(_pad(a_s.float(), Mp, kb, value=1.0))
    if b_kind == BLOCKS:
        nb = math.ceil(N / BLOCK)
        if tuple(b_s.shape) != (nb, kb):
            raise ValueError(f"prepare: b_s {tuple(b_s.shape)} is not [{nb}, {kb}] (128x128 "
                             f"blocks of b {tuple(b_q.shape)})")
        Np, L4 = nb * BLOCK, _round_up(kb, 4)
        # [nb, L4] row-major (K blocks padded to 4 with ones), viewed as [L4, nb]: strides (1, L4)
        scale_b = _pad(b_s.float(), nb, L4, value=1.0).contiguous().t()
    elif b_kind == TILES:
        if tuple(b_s.shape) != (N, kb):
            raise ValueError(f"prepare: b_s {tuple(b_s.shape)} is not [{N}, {kb}] (1x128 tiles "
                             f"of b {tuple(b_q.shape)})")
        Np = _round_up(max(N, 1), max(ROW_ALIGN, COL_ALIGN))
        scale_b = outer_major(_pad(b_s.float(), Np, kb, value=1.0))
    else:
        raise ValueError(f"b_kind={b_kind!r} is invalid: allowed values are '128x128', '1x128'")
    mat_b = _pad(b_q, Np, Kp).contiguous().t()  # [Kp, Np], strides (1, Kp): column-major
    return ScaledMmArgs(mat_a, mat_b, scale_a, TILES, scale_b, b_kind, M, N, K)


def _scaling_type(name: str):
    import torch.nn.functional as F

    return getattr(F.ScalingType, f"BlockWise{name}")


def torch_scaled_mm(args: ScaledMmArgs, out_dtype: torch.dtype) -> torch.Tensor:
    """torch's blockwise F.scaled_mm on prepared arguments -> the [Mp, Np] output."""
    import torch.nn.functional as F

    return F.scaled_mm(args.mat_a, args.mat_b, args.scale_a, _scaling_type(args.recipe_a),
                       args.scale_b, _scaling_type(args.recipe_b), output_dtype=out_dtype)


def _storage_values(scale: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` float32 values of `scale`'s storage from its offset, in memory order."""
    return scale.as_strided((count,), (1,), scale.storage_offset())


def kernel_scales(scale: torch.Tensor, kind: str, rows: int, k: int) -> torch.Tensor:
    """[rows, ceil(k/128)] per-row scales of an operand, read from a kernel-layout scale tensor
    by the documented storage offsets: kind '1x128' (scale (r, j) at r + j * rows), '128x128'
    (the operand's rows in 128-row blocks; block (j, n) of mat_b at j + n * L4)."""
    kb = math.ceil(k / BLOCK)
    if kind == TILES:
        flat = _storage_values(scale, rows * kb)
        r = torch.arange(rows).unsqueeze(1)
        j = torch.arange(kb).unsqueeze(0)
        return flat[(r + j * rows).reshape(-1)].view(rows, kb)
    nb, L4 = math.ceil(rows / BLOCK), _round_up(kb, 4)
    flat = _storage_values(scale, nb * L4)
    n = torch.arange(rows).unsqueeze(1) // BLOCK
    j = torch.arange(kb).unsqueeze(0)
    return flat[(j + n * L4).reshape(-1)].view(rows, kb)


def apply_blockwise_scales(q: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """CPU reference of the kernel's view of one operand: q [rows, k] E4M3 (rows along M for
    mat_a, along N for mat_b) times its scales read from the kernel layout -> float32."""
    rows, k = q.shape
    s = kernel_scales(scale, kind, rows, k)  # [rows, kb]
    return (q.float().unflatten(1, (-1, BLOCK)) * s.unsqueeze(-1)).flatten(1)


def reference_scaled_mm(args: ScaledMmArgs, out_dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """What the kernel computes from `args`, on CPU: dequantise both operands through their
    kernel-layout scales and multiply in float32 (the padding cut away first, so the product is
    bit-identical to the emulation's). Returns [Mp, Np] with zeros outside [M, N]."""
    a = apply_blockwise_scales(args.mat_a, args.scale_a, args.recipe_a)
    b = apply_blockwise_scales(args.mat_b.t(), args.scale_b, args.recipe_b)
    M, N, K = args.M, args.N, args.K
    out = torch.zeros(args.mat_a.shape[0], args.mat_b.shape[1], dtype=out_dtype)
    out[:M, :N] = (a[:M, :K] @ b[:N, :K].t()).to(out_dtype)
    return out


MmFn = Callable[[ScaledMmArgs, torch.dtype], torch.Tensor]


class TorchBlockwiseGemm(Gemm):
    """DeepSeek-V3's FP8 GEMMs on torch's blockwise scaled_mm (CUDA, SM 9.x). `mm`: the scaled
    GEMM on prepared arguments (default torch's F.scaled_mm; tests inject
    `reference_scaled_mm`). Outputs in the input dtype (the kernel writes BF16 for BF16 inputs,
    float32 otherwise)."""

    name = "fp8-blockwise-torch"

    def __init__(self, pow2_scales: bool = False, mm: Optional[MmFn] = None):
        self.pow2_scales = pow2_scales
        self.mm = mm or torch_scaled_mm

    # -- quantisation (the emulation's quantisers and floors) ----------------------------------
    def _tiles(self, t: torch.Tensor, floor: float = AMAX_FLOOR):
        return quantize_1x128(t, pow2_scales=self.pow2_scales, amax_floor=floor)

    def _blocks(self, w: torch.Tensor):
        return quantize_128x128(w, pow2_scales=self.pow2_scales)

    def _run(self, a, b, b_kind: str, dtype: torch.dtype) -> torch.Tensor:
        (a_q, a_s), (b_q, b_s) = a, b
        M, N = a_q.shape[0], b_q.shape[0]
        if M == 0 or N == 0:
            return torch.zeros(M, N, dtype=dtype, device=a_q.device)
        args = prepare(a_q, a_s, b_q, b_s, b_kind)
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
        return self.mm(args, out_dtype)[:M, :N].to(dtype)

    @staticmethod
    def _transposed_blocks(qs):
        """W's 128x128 blocks as the blocks of W^T: codes transposed, scales transposed."""
        q, s = qs
        return q.t().contiguous(), s.t().contiguous()

    # -- the three GEMMs -----------------------------------------------------------------------
    def fprop(self, x, w):
        return self._run(self._tiles(x), self._blocks(w), BLOCKS, x.dtype)

    def dgrad(self, dy, w):
        return self._run(self._tiles(dy, GRAD_AMAX_FLOOR),
                         self._transposed_blocks(self._blocks(w)), BLOCKS, dy.dtype)

    def wgrad(self, dy, x):
        return self._run(self._tiles(dy.t(), GRAD_AMAX_FLOOR), self._tiles(x.t()), TILES,
                         x.dtype)

    # -- routed experts: one scaled_mm per expert, quantisation batched ------------------------
    def _expert_blocks(self, w: torch.Tensor) -> List:
        """[(q, s)] of each expert's [N, K] weight in 128x128 blocks: one quantisation for all
        experts when N is a multiple of 128 (no block straddles two experts)."""
        G, N, K = w.shape
        if N % BLOCK or G == 0:
            return [self._blocks(w[g]) for g in range(G)]
        q, s = self._blocks(w.reshape(G * N, K))
        nb = N // BLOCK
        return [(q[g * N:(g + 1) * N], s[g * nb:(g + 1) * nb]) for g in range(G)]

    def grouped_fprop(self, x, w, counts):
        q, s = self._tiles(x)  # 1x128 tiles never cross rows: all groups at once
        blocks = self._expert_blocks(w)
        outs, row = [], 0
        for g, n in enumerate(counts):
            outs.append(self._run((q[row:row + n], s[row:row + n]), blocks[g], BLOCKS, x.dtype))
            row += n
        return torch.cat(outs, 0) if outs else x.new_zeros(0, w.shape[1])

    def grouped_dgrad(self, dy, w, counts):
        q, s = self._tiles(dy, GRAD_AMAX_FLOOR)
        blocks = self._expert_blocks(w)
        outs, row = [], 0
        for g, n in enumerate(counts):
            outs.append(self._run((q[row:row + n], s[row:row + n]),
                                  self._transposed_blocks(blocks[g]), BLOCKS, dy.dtype))
            row += n
        return torch.cat(outs, 0)

    # grouped_wgrad: the interface's per-expert loop (the tiles run along each expert's tokens)
