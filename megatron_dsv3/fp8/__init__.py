"""FP8 training with DeepSeek-V3's fine-grained scaling (1x128 activation tiles, 128x128 weight
blocks, FP32 promotion): `quant` (quantisers and the blockwise GEMM, torch only), `gemm` (the
three GEMMs of a linear layer, emulated), `torch_gemm` (the same on torch's blockwise
F.scaled_mm), `recipe` (the switch and the Transformer Engine adapter), `backends` (which GEMM
backend runs here: emulated, torch, te; docs/backends.md), `te_autocast` (TE's autocast with our
recipe on the 'te' backend)."""

from megatron_dsv3.lazy import lazy_attributes

from megatron_dsv3.fp8.quant import (
    blockwise_matmul,
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
)

# imported on first use: `recipe` reads the config module (megatron-core), `gemm` the core GEMMs
_LAZY = {"FP8Recipe": "recipe", "recipe_from_config": "recipe", "fp8_recipe_for_te": "recipe",
         "Fp8BlockwiseGemm": "gemm", "TorchBlockwiseGemm": "torch_gemm"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = ["blockwise_matmul", "dequantize_1x128", "dequantize_128x128", "quantize_1x128",
           "quantize_128x128", *_LAZY]
