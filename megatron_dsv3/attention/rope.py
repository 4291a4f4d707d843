"""Rotary embeddings as DeepSeek-V3 uses them: YaRN-extended frequencies, interleaved pairs.

inv_freq_i = base^(-2i/d), blended between extrapolation (high frequencies) and interpolation by
`factor` (low frequencies) over YaRN's ramp [low, high] from beta_fast/beta_slow. cos/sin are scaled
by the attention factor get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) and the
softmax scale by get_mscale(factor, mscale_all_dim)^2, as in DeepSeek's code and HF transformers.
Pairs (x[2i], x[2i+1]) are rotated (DeepSeek's complex-number form; HF's rope_interleave=True).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch


def get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_positions: int,
                  beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN inverse frequencies [dim // 2] in float64-accurate float32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    extrapolation = 1.0 / base**exponents
    interpolation = extrapolation / factor

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep_extrapolation = 1 - ramp
    inv = interpolation * (1 - keep_extrapolation) + extrapolation * keep_extrapolation
    return inv.float()


class YarnRotary:
    """cos/sin tables for positions, built on the device of the request and cached per device."""

    def __init__(self, config):
        dim = config.qk_pos_emb_head_dim
        base = float(config.rotary_base)
        if config.rope_type == "yarn":
            factor = float(config.rotary_scaling_factor)
            self.inv_freq = yarn_inv_freq(dim, base, factor, config.original_max_position_embeddings,
                                          config.beta_fast, config.beta_slow)
            self.attention_factor = (get_mscale(factor, config.mscale)
                                     / get_mscale(factor, config.mscale_all_dim)
                                     if config.mscale and config.mscale_all_dim
                                     else get_mscale(factor))
            self.softmax_mscale = (get_mscale(factor, config.mscale_all_dim) ** 2
                                   if config.mscale_all_dim else 1.0)
        else:
            self.inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            self.inv_freq = self.inv_freq.float()
            self.attention_factor, self.softmax_mscale = 1.0, 1.0
        self._cache: Dict[Tuple[torch.device, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [*positions.shape, dim // 2] in float32 on positions' device."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def cos_sin_range(self, seq_len: int, device: torch.device):
        key = (device, seq_len)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != device}
            self._cache[key] = self.cos_sin(torch.arange(seq_len, device=device))
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., s, (b,) heads?, d] — cos/sin broadcast against x[..., ::2].

    Callers shape cos/sin to broadcast over every dimension but the last. The pairs are read as
    complex numbers and multiplied by cos + i sin: one kernel forward and one backward (the
    conjugate), instead of four products, two sums and a stack.
    """
    dtype = x.dtype
    x = x.float()
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(st % 2 for st in x.stride()[:-1]):
        x = x.contiguous()  # view_as_complex needs (real, imag) pairs adjacent in memory
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    out = torch.view_as_real(pairs * torch.complex(cos.float(), sin.float())).flatten(-2)
    return out.to(dtype)


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                inverse: bool = False) -> torch.Tensor:
    """out[...] = apply_rotary(x, cos, sin) written through out's strides (x may be a strided or
    expanded view); `inverse`: the rotation by the opposite angle, RoPE's backward. float32 x and
    out whose pairs lie adjacent in memory take one complex product straight into out
    (apply_rotary's product, up to the last bit where torch's vectorised and scalar complex loops
    round apart); anything else goes through apply_rotary and a copy."""
    sin = -sin if inverse else sin
    if x.dtype is torch.float32 and out.dtype is torch.float32 and _pairs_adjacent(out) \
            and _pairs_adjacent(x):
        rotation = torch.complex(cos.float(), sin.float())
        torch.mul(torch.view_as_complex(x.unflatten(-1, (-1, 2))), rotation,
                  out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    else:
        out.copy_(apply_rotary(x, cos, sin))
    return out


def _pairs_adjacent(t: torch.Tensor) -> bool:
    """Whether t's last dim can be viewed as complex pairs in place."""
    return t.stride(-1) == 1 and t.shape[-1] % 2 == 0 and t.storage_offset() % 2 == 0 \
        and all(st % 2 == 0 for st in t.stride()[:-1])
