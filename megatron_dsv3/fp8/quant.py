"""DeepSeek-V3's fine-grained FP8 quantisation, device-agnostic (report section 3.3).

Activations and activation gradients: one scale per 1x128 tile along the last (reduction)
dimension. Weights: one scale per 128x128 block. E4M3 (float8_e4m3fn, max 448):

    scale = amax / 448 (amax of the tile, clamped below at amax_floor)   q = x / scale (E4M3)
    x ~= q * scale                                                    (dequantisation)

`scale` is the dequantisation multiplier — DeepSeek's checkpoints call the 128x128 weight scales
`weight_scale_inv` and dequantise as block * scale_inv, the same number. With
`pow2_scales=True` the scale is rounded *up* to a power of two (UE8M0, as DeepSeek's dispatch and
DeepGEMM's newer kernels use), so q never exceeds 448.

Shapes that are not multiples of 128 work: the last tile/block is partial and its amax is taken
over the elements that exist.

Special values:
- `amax_floor` defaults to DeepSeek's 1e-4 (activations and weights are O(1)); activation
  gradients are many orders smaller, so the FP8 GEMMs quantise them with GRAD_AMAX_FLOOR (1e-30,
  only there to keep zero tiles finite — Transformer Engine's blockwise recipe likewise uses no
  epsilon): with 1e-4, gradients of ~1e-7 would lose most of their mantissa;
- an all-zero tile gets the smallest scale amax_floor/448 (never 0 or NaN) and quantises to
  exact zeros;
- a tile containing inf or NaN gets a NaN scale, so the whole tile dequantises to NaN: an overflow
  surfaces in the loss and gradient-norm checks instead of being saturated into a finite number.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
GRAD_AMAX_FLOOR = 1e-30
BLOCK = 128


def _scale_from_amax(amax: torch.Tensor, pow2_scales: bool,
                     amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """amax [...] float32 (NaN where the tile is not finite) -> dequantisation scale."""
    scale = amax.clamp_min(amax_floor) / E4M3_MAX
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _tile_amax(tiles: torch.Tensor, dims) -> torch.Tensor:
    """amax over `dims`, NaN when any element is inf or NaN."""
    t = tiles.float()
    amax = t.abs().amax(dim=dims)
    finite = torch.isfinite(t).all(dim=dims) if isinstance(dims, int) else torch.isfinite(t).flatten(
        -len(dims)).all(-1)
    return torch.where(finite, amax, torch.full_like(amax, float("nan")))


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    # explicit saturation: the CPU cast saturates, CUDA casts need not
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    k = x.shape[-1]
    pad = (-k) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize_1x128(x: torch.Tensor, *, pow2_scales: bool = False,
                   amax_floor: float = AMAX_FLOOR) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q float8_e4m3fn [..., K], scale float32 [..., ceil(K/128)])."""
    K = x.shape[-1]
    tiles = _pad_last(x.float(), BLOCK).unflatten(-1, (-1, BLOCK))  # [..., kb, 128]
    scale = _scale_from_amax(_tile_amax(tiles, -1), pow2_scales, amax_floor)
    q = _to_e4m3(tiles / scale.unsqueeze(-1)).flatten(-2)[..., :K]
    return q, scale


def dequantize_1x128(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_1x128: q [..., K] * scale per 1x128 tile -> dtype."""
    K = q.shape[-1]
    tiles = _pad_last(q.float(), BLOCK).unflatten(-1, (-1, BLOCK))
    return (tiles * scale.float().unsqueeze(-1)).flatten(-2)[..., :K].to(dtype)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> zero-padded blocks [nb, kb, 128, 128]."""
    N, K = w.shape
    padded = torch.nn.functional.pad(w.float(), (0, (-K) % BLOCK, 0, (-N) % BLOCK))
    nb, kb = padded.shape[0] // BLOCK, padded.shape[1] // BLOCK
    return padded.view(nb, BLOCK, kb, BLOCK).transpose(1, 2)


def quantize_128x128(w: torch.Tensor, *, pow2_scales: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q float8_e4m3fn [N, K], scale float32 [ceil(N/128), ceil(K/128)])."""
    if w.dim() != 2:
        raise ValueError(f"quantize_128x128 expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    blocks = _blocks(w)  # [nb, kb, 128, 128]
    scale = _scale_from_amax(_tile_amax(blocks, (-2, -1)), pow2_scales)
    q = _to_e4m3(blocks / scale[..., None, None])
    q = q.transpose(1, 2).reshape(blocks.shape[0] * BLOCK, blocks.shape[1] * BLOCK)[:N, :K]
    return q.contiguous(), scale


def dequantize_128x128(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_128x128 (also DeepSeek's `weight * weight_scale_inv` per block)."""
    N, K = q.shape
    nb, kb = math.ceil(N / BLOCK), math.ceil(K / BLOCK)
    if tuple(scale.shape) != (nb, kb):
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not match a [{N}, {K}] weight "
                         f"in 128x128 blocks (expected [{nb}, {kb}])")
    blocks = _blocks(q)  # float32 view of the fp8 values
    out = (blocks * scale.float()[..., None, None]).transpose(1, 2).reshape(nb * BLOCK, kb * BLOCK)
    return out[:N, :K].to(dtype)


def blockwise_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor,
                     b_scale: torch.Tensor, *, out_dtype=torch.bfloat16) -> torch.Tensor:
    """a [M, K] in 1x128 tiles times b [N, K] in 128x128 blocks, transposed (DeepGEMM's NT layout).

    Each 128-wide K block is multiplied in float32 (products of E4M3 values are exact in float32),
    scaled by a_scale[m, j] * b_scale[n // 128, j] and added into a float32 accumulator:
    promotion to FP32 every N_C = 128 elements of K, as in DeepSeek-V3's GEMMs.
    """
    M, K = a_q.shape
    N, K2 = b_q.shape
    if K != K2:
        raise ValueError(f"blockwise_matmul: a has K={K} but b has K={K2}")
    kb = math.ceil(K / BLOCK)
    if tuple(a_scale.shape) != (M, kb) or tuple(b_scale.shape) != (math.ceil(N / BLOCK), kb):
        raise ValueError(f"blockwise_matmul: scales {tuple(a_scale.shape)} / "
                         f"{tuple(b_scale.shape)} do not match a [{M}, {K}] and b [{N}, {K}]")
    a, b = a_q.float(), b_q.float()
    b_scale_rows = b_scale.float().repeat_interleave(BLOCK, dim=0)[:N]  # [N, kb]
    acc = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    for j in range(kb):
        k0, k1 = j * BLOCK, min(K, (j + 1) * BLOCK)
        partial = a[:, k0:k1] @ b[:, k0:k1].t()
        acc += partial * a_scale[:, j:j + 1].float() * b_scale_rows[:, j][None, :]
    return acc.to(out_dtype)


# -- coarser scalings, for the quantisation-error comparison ---------------------------------
def quantize_per_tensor(x: torch.Tensor, *, pow2_scales: bool = False):
    scale = _scale_from_amax(_tile_amax(x.reshape(1, -1), -1), pow2_scales)[0]
    return _to_e4m3(x.float() / scale), scale


def quantize_per_row(x: torch.Tensor, *, pow2_scales: bool = False):
    """One scale per row of x [..., K] (per-token for activations, per-channel for weights)."""
    scale = _scale_from_amax(_tile_amax(x, -1), pow2_scales)
    return _to_e4m3(x.float() / scale.unsqueeze(-1)), scale
