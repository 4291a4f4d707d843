"""The three GEMMs of a linear layer with DeepSeek-V3's fine-grained FP8 quantisation.

    fprop  y  = x  W^T   x: 1x128 tiles along K        W: 128x128 blocks
    dgrad  dx = dy W     dy: 1x128 tiles along N       W: the same 128x128 blocks, transposed use
    wgrad  dW = dy^T x   dy^T and x^T: 1x128 tiles along M (the tokens, wgrad's reduction dim)

Activation gradients are quantised with the gradient amax floor (see fp8.quant): DeepSeek's 1e-4
floor is meant for O(1) activations and measurably slows training when applied to gradients.

Emulated portably: quantise to E4M3 with the recipe's scales, dequantise, multiply in float32
(equal to `blockwise_matmul`'s per-128 promotion up to float32 rounding order; proven in tests).
Outputs are returned in the input dtype.
"""

from __future__ import annotations

import torch

from megatron_dsv3.core.gemm import Gemm
from megatron_dsv3.fp8.quant import (
    AMAX_FLOOR,
    GRAD_AMAX_FLOOR,
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
)


class Fp8BlockwiseGemm(Gemm):
    name = "fp8-blockwise"

    def __init__(self, pow2_scales: bool = False):
        self.pow2_scales = pow2_scales

    def tiles(self, t: torch.Tensor, floor: float = AMAX_FLOOR) -> torch.Tensor:
        """t quantised in 1x128 tiles along its last dim, dequantised to float32."""
        return dequantize_1x128(*quantize_1x128(t, pow2_scales=self.pow2_scales, amax_floor=floor))

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """w quantised in 128x128 blocks, dequantised to float32."""
        return dequantize_128x128(*quantize_128x128(w, pow2_scales=self.pow2_scales))

    def fprop(self, x, w):
        return (self.tiles(x) @ self.blocks(w).t()).to(x.dtype)

    def dgrad(self, dy, w):
        return (self.tiles(dy, GRAD_AMAX_FLOOR) @ self.blocks(w)).to(dy.dtype)

    def wgrad(self, dy, x):
        return (self.tiles(dy.t(), GRAD_AMAX_FLOOR) @ self.tiles(x.t()).t()).to(x.dtype)
