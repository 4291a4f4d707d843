"""The FP8 recipe: what is quantised how, and which GEMMs a linear layer runs.

DeepSeek-V3's recipe: E4M3 for every GEMM input of the linear layers; activations and activation
gradients in 1x128 tiles, weights in 128x128 blocks; float32 or power-of-2 scales; FP32
accumulation with promotion every 128. Kept in BF16/FP32: the embedding, the output head, the
MoE gate (router), the norms and the attention core.

How to switch it on:
- `dsv3_fp8_recipe` on DeepSeekV3Config ("deepseek" = float32 scales, "deepseek-pow2" = UE8M0
  scales): our linear layers run the portable emulation (quantise, dequantise, float32 GEMM) on
  any device. This is the CPU path, and the path wherever Transformer Engine lacks blockwise FP8.
- Megatron's own `fp8="e4m3"` + `fp8_recipe="blockwise"` (Megatron-LM's `--fp8-format e4m3
  --fp8-recipe blockwise`): with Transformer Engine on CUDA, the TE backend of `layer_specs` runs
  TE's Float8BlockScaling, which `to_te_recipe` configures identically. megatron-core refuses
  `fp8` for MoE models when TE is missing, so on CPU only the field above applies.
In this codebase the high-precision modules never reach a `Gemm`: the embedding and output head
are Megatron's modules, the router multiplies in float32, norms and SDPA are elementwise/attention.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

from megatron_dsv3.core.gemm import DEFAULT_GEMM, Gemm

RECIPES = {"deepseek": False, "deepseek-pow2": True}  # name -> power-of-2 scales
HIGH_PRECISION = ("embedding", "output_layer", "router", "norm", "core_attention")


@dataclasses.dataclass(frozen=True)
class FP8Recipe:
    fmt: str = "e4m3"
    activation_tile: Tuple[int, int] = (1, 128)
    gradient_tile: Tuple[int, int] = (1, 128)
    weight_block: Tuple[int, int] = (128, 128)
    pow2_scales: bool = False
    accumulate: str = "fp32, promoted every 128 along K"
    high_precision: Tuple[str, ...] = HIGH_PRECISION

    def gemm(self) -> Gemm:
        from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm

        return Fp8BlockwiseGemm(self.pow2_scales)


def recipe_from_config(config) -> Optional[FP8Recipe]:
    """The recipe a config asks for (None: no FP8 in our linear layers)."""
    name = getattr(config, "dsv3_fp8_recipe", None)
    if name is not None:
        if name not in RECIPES:
            raise ValueError(f"dsv3_fp8_recipe={name!r} is invalid: allowed values are None, "
                             f"{', '.join(repr(r) for r in RECIPES)}")
        return FP8Recipe(pow2_scales=RECIPES[name])
    if getattr(config, "fp8", None):
        recipe = str(getattr(config, "fp8_recipe", ""))
        if "blockwise" not in recipe:
            raise ValueError(f"fp8_recipe={recipe!r} is not DeepSeek's fine-grained recipe: "
                             "allowed value with megatron-dsv3 layers is 'blockwise' (or use "
                             "dsv3_fp8_recipe)")
        pow2 = os.environ.get("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0") != "1"
        return FP8Recipe(pow2_scales=pow2)
    return None


def gemm_for_config(config) -> Gemm:
    """The GEMM strategy for a linear layer built with `config`."""
    recipe = recipe_from_config(config)
    return DEFAULT_GEMM if recipe is None else recipe.gemm()


def to_te_recipe(recipe: FP8Recipe):
    """Transformer Engine's Float8BlockScaling with the same numerics (TE >= 2.x, SM90+).

    Float8BlockScaling takes its float32-vs-power-of-2 choice from class attributes
    (fp8_quant_fwd_inp / fp8_quant_fwd_weight / fp8_quant_bwd_grad, QParams read from
    NVTE_FP8_BLOCK_SCALING_FP32_SCALES at import); constructor keywords for it are silently
    dropped. We assign new QParams on the instance after construction: power-of-2 as the recipe
    says, and DeepSeek's amax floor of 1e-4 (AMAX_FLOOR).
    """
    from transformer_engine.common.recipe import Float8BlockScaling, Format

    from megatron_dsv3.fp8.quant import AMAX_FLOOR

    te = Float8BlockScaling(fp8_format=Format.E4M3, x_block_scaling_dim=1,
                            w_block_scaling_dim=2, grad_block_scaling_dim=1)
    for attr in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
        qparams_cls = type(getattr(te, attr))
        setattr(te, attr, qparams_cls(power_2_scale=recipe.pow2_scales, amax_epsilon=AMAX_FLOOR))
    return te
