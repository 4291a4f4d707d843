"""DeepSeek-V3's fine-grained FP8 quantisation, device-agnostic (report section 3.3).

Activations and activation gradients: one scale per 1x128 tile along the last (reduction)
dimension. Weights: one scale per 128x128 block. E4M3 (float8_e4m3fn, max 448):

    scale = amax / 448 (amax of the tile, clamped below at amax_floor)   q = x / scale (E4M3)
    x ~= q * scale                                                    (dequantisation)

`scale` is always the dequantisation multiplier (dequantized = q * scale). DeepSeek's
checkpoints call the 128x128 weight scales `weight_scale_inv` and dequantise as
block * scale_inv: the same number, so `dequantize_128x128(weight, weight_scale_inv)` reads an HF
FP8 weight and `quantize_128x128(w)` writes one. With `pow2_scales=True` the scale is rounded *up*
to a power of two (UE8M0, as DeepSeek's dispatch and DeepGEMM's newer kernels use), so |x| / scale
never exceeds 448 and nothing saturates.

Shapes that are not multiples of 128 work: the last tile/block is partial and its amax is taken
over the elements that exist.

Special values:
- `amax_floor` defaults to DeepSeek's 1e-4 (activations and weights are O(1)); activation
  gradients are many orders smaller, so the FP8 GEMMs quantise them with GRAD_AMAX_FLOOR (1e-30,
  only there to keep zero tiles finite — Transformer Engine's blockwise recipe likewise uses no
  epsilon): with 1e-4, gradients of ~1e-7 would lose most of their mantissa;
- an all-zero tile gets the smallest scale amax_floor/448 (never 0 or NaN) and quantises to
  exact zeros;
- a tile containing inf or NaN gets a NaN scale (and NaN codes), so the whole tile dequantises to
  NaN and every GEMM output it feeds is NaN: an overflow surfaces in the loss and gradient-norm
  checks instead of being saturated into a finite number. Other tiles are unaffected.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
GRAD_AMAX_FLOOR = 1e-30
MIN_AMAX_FLOOR = E4M3_MAX * 2.0 ** -126  # below it a zero tile's scale would be subnormal
BLOCK = 128


def _scale_from_amax(amax: torch.Tensor, pow2_scales: bool,
                     amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """amax [...] float32 (NaN where the tile is not finite) -> dequantisation scale [...]."""
    scale = amax.clamp_min(amax_floor) / E4M3_MAX
    if pow2_scales:
        scale = _round_up_to_power_of_2(scale)
    return scale


def _round_up_to_power_of_2(scale: torch.Tensor) -> torch.Tensor:
    """The smallest 2^p >= scale, exactly, on every device (NaN stays NaN).

    Built from the exponent bits rather than exp2(ceil(log2(s))): a float32 log2 may round
    log2(s) down to an integer for s just above 2^p, and the scale would then be rounded *down*,
    pushing |x| / scale past 448. Scales are normal float32 numbers here (amax_floor / 448 >= 2^-126
    for the floors we use, amax < 2^128).
    """
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    p = torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int32)
    pow2 = ((p + 127) << 23).view(torch.float32)  # float32 bit pattern of 2^p
    return torch.where(torch.isnan(scale), scale, pow2)


def _tile_amax(tiles: torch.Tensor, dims) -> torch.Tensor:
    """amax over `dims`, NaN when any element is inf or NaN."""
    # amax propagates NaN and keeps inf, so checking the [.. tiles] amax checks every element
    amax = tiles.float().abs().amax(dim=dims)
    return torch.where(torch.isfinite(amax), amax, torch.full_like(amax, float("nan")))


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
    if not (amax_floor >= MIN_AMAX_FLOOR and math.isfinite(amax_floor)):  # (NaN fails both)
        raise ValueError(f"amax_floor={amax_floor!r} is invalid: allowed values are finite floats "
                         f">= {MIN_AMAX_FLOOR:.3g} (448 * 2^-126, so every scale is a normal "
                         "float32; an infinite floor makes every scale inf and every value NaN)")
    K = x.shape[-1]
    tiles = _pad_last(x.float(), BLOCK).unflatten(-1, (-1, BLOCK))  # [..., kb, 128]
    scale = _scale_from_amax(_tile_amax(tiles, -1), pow2_scales, amax_floor)
    q = _to_e4m3(tiles / scale.unsqueeze(-1)).flatten(-2)[..., :K]
    return q, scale


def dequantize_1x128(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_1x128: q [..., K] * scale [..., ceil(K/128)] per 1x128 tile -> dtype."""
    K = q.shape[-1]
    if scale.shape != (*q.shape[:-1], -(-K // BLOCK)):  # (a broadcast would reuse one row's)
        raise ValueError(f"dequantize_1x128: scale has shape {tuple(scale.shape)}; allowed is "
                         f"q's leading shape and one scale per 1x128 tile of its last dimension: "
                         f"{(*q.shape[:-1], -(-K // BLOCK))} for q of shape {tuple(q.shape)}")
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
        raise ValueError(f"quantize_128x128 expects a 2-D weight [N, K], got shape "
                         f"{tuple(w.shape)}")
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
    # q * scale of its block, in place on the float32 copy (no padding, no block transposes)
    out = q.float()
    row_scales = scale.float().repeat_interleave(BLOCK, dim=0)[:N]  # [N, kb]
    full = K // BLOCK
    out[:, :full * BLOCK].unflatten(1, (full, BLOCK)).mul_(row_scales[:, :full, None])
    if K % BLOCK:
        out[:, full * BLOCK:].mul_(row_scales[:, full:])
    return out.to(dtype)


def blockwise_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor,
                     b_scale: torch.Tensor, *, out_dtype=torch.bfloat16) -> torch.Tensor:
    """a [M, K] in 1x128 tiles times b [N, K] transposed (DeepGEMM's NT layout) -> [M, N].

    b is in 128x128 blocks (b_scale [ceil(N/128), ceil(K/128)], the weight of fprop and dgrad) or
    in 1x128 tiles (b_scale [N, ceil(K/128)], the activation of wgrad, DeepGEMM's 1D x 1D case).
    Each 128-wide K block j is multiplied in float32 (products of E4M3 values are exact in
    float32), scaled by a_scale[m, j] * b_scale[row of n, j] and added into a float32 accumulator:
    promotion to FP32 every N_C = 128 elements of K, as in DeepSeek-V3's GEMMs. A NaN scale (a
    tile that held inf/NaN) makes the outputs that tile contributes to NaN.
    """
    M, K = a_q.shape
    N, K2 = b_q.shape
    if K != K2:
        raise ValueError(f"blockwise_matmul: a has K={K} but b has K={K2}")
    kb = math.ceil(K / BLOCK)
    if tuple(a_scale.shape) != (M, kb):
        raise ValueError(f"blockwise_matmul: a_scale {tuple(a_scale.shape)} does not match a "
                         f"[{M}, {K}] in 1x128 tiles (expected [{M}, {kb}])")
    if tuple(b_scale.shape) == (math.ceil(N / BLOCK), kb):
        b_scale_rows = b_scale.float().repeat_interleave(BLOCK, dim=0)[:N]  # [N, kb]
    elif tuple(b_scale.shape) == (N, kb):
        b_scale_rows = b_scale.float()
    else:
        raise ValueError(f"blockwise_matmul: b_scale {tuple(b_scale.shape)} does not match b "
                         f"[{N}, {K}]: expected [{math.ceil(N / BLOCK)}, {kb}] (128x128 blocks) "
                         f"or [{N}, {kb}] (1x128 tiles)")
    a, b = a_q.float(), b_q.float()
    acc = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    for j in range(kb):
        k0, k1 = j * BLOCK, min(K, (j + 1) * BLOCK)
        partial = a[:, k0:k1] @ b[:, k0:k1].t()  # [M, N], exact products, float32 sums
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
