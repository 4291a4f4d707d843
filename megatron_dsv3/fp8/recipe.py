"""The FP8 recipe: what is quantised how, and which GEMMs a linear layer runs.

DeepSeek-V3's recipe (report section 3.3): E4M3 for every GEMM input of the linear layers;
activations and activation gradients in 1x128 tiles, weights in 128x128 blocks; float32 or
power-of-2 scales; FP32 accumulation with promotion every 128. Kept in BF16/FP32: the embedding,
the output head, the MoE gate (router), the norms and the attention core.

How to switch it on:
- `dsv3_fp8_recipe` on DeepSeekV3Config ("deepseek" = float32 scales, "deepseek-pow2" = UE8M0
  scales; the trainer's --fp8 / --fp8-pow2-scales): every linear layer of ours runs
  `Fp8BlockwiseGemm`, the portable emulation (quantise, dequantise, float32 GEMM) on any device.
  This is the path on CPU and wherever Transformer Engine is absent.
- Megatron's own `fp8="e4m3"` + `fp8_recipe="blockwise"` (Megatron-LM's `--fp8-format e4m3
  --fp8-recipe blockwise`; Megatron-LM builds a plain MLATransformerConfig, so this is the switch
  there) needs Transformer Engine: megatron-core 0.16.1 then wraps each layer in
  TE's autocast with `Float8BlockScaling` (power-of-2 scales unless
  NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1), which drives the TE linears of `layer_specs`' TE backend,
  and our routed experts (GroupedExperts, not a TE module) follow with the same scale choice
  through `Fp8BlockwiseGemm`. Without TE megatron-core silently runs such a config in high
  precision (dense) or fails with a TypeError (MoE, in TransformerConfig.__post_init__), so the
  config's validation (`configs.config.validate_fp8`) refuses `fp8` without TE at configuration
  time, naming the field to use. Setting both `dsv3_fp8_recipe` and `fp8` is refused: the TE
  layers would follow Megatron's recipe and the routed experts ours.
- `fp8_recipe_for_te(recipe)` gives the TE recipe with exactly our numerics for users who enter
  `te.pytorch.autocast(enabled=True, recipe=...)` themselves.

Who chooses: `megatron_dsv3.layer_specs.gemm_strategy(config)` (the binding) maps the recipe to
a `Gemm`, and the specs hand that function to each GEMM-owning module; modules below the binding
never read the recipe. Which modules run FP8 (the high-precision list is real because nothing
else owns a GEMM strategy): our linears (`core.linear`: MLA linear_q_proj / linear_q_down_proj /
linear_q_up_proj / linear_kv_down_proj / linear_kv_up_proj / linear_proj, the dense and
shared-expert MLPs' linear_fc1 / linear_fc2, MTP's eh_proj) and the routed experts
(`moe.experts.GroupedExperts`, fc1 and fc2 per expert through `core.grouped_gemm`'s per-group
loop). The embedding and output head are Megatron's modules (no `Gemm`), the router multiplies in
float32, norms are elementwise and the attention core is SDPA: they stay in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

from megatron_dsv3.configs.config import validate_fp8
from megatron_dsv3.core.gemm import Gemm

# dsv3_fp8_recipe (the names configs.config.FP8_RECIPES allows) -> power-of-2 scales
RECIPES = {"deepseek": False, "deepseek-pow2": True}
HIGH_PRECISION = ("embedding", "output_layer", "router", "norm", "core_attention")


@dataclasses.dataclass(frozen=True)
class FP8Recipe:
    """DeepSeek-V3's fine-grained FP8 recipe. Only pow2_scales varies; the other fields document
    the recipe and accept their one value only (ValueError naming the field otherwise: a value
    the GEMMs would not honour is refused, never ignored)."""

    fmt: str = "e4m3"
    activation_tile: Tuple[int, int] = (1, 128)
    gradient_tile: Tuple[int, int] = (1, 128)
    weight_block: Tuple[int, int] = (128, 128)
    pow2_scales: bool = False
    accumulate: str = "fp32, promoted every 128 along K"
    high_precision: Tuple[str, ...] = HIGH_PRECISION

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "pow2_scales":
                if not isinstance(value, bool):
                    raise ValueError(f"FP8Recipe.pow2_scales={value!r} is invalid: allowed "
                                     "values are True, False")
            elif value != f.default:
                raise ValueError(f"FP8Recipe.{f.name}={value!r} is invalid: the only allowed "
                                 f"value is {f.default!r} (DeepSeek-V3's recipe, which the "
                                 "GEMMs implement; only pow2_scales varies)")

    def gemm(self) -> Gemm:
        from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm

        return Fp8BlockwiseGemm(self.pow2_scales)


def recipe_from_config(config) -> Optional[FP8Recipe]:
    """The recipe a config asks for (None: no FP8 in our linear layers).

    Raises ValueError naming the field for a recipe our layers cannot run (the check lives with
    the config, `configs.config.validate_fp8`): an unknown dsv3_fp8_recipe, Megatron's `fp8` other
    than 'e4m3' or with an fp8_recipe other than 'blockwise', `fp8` without Transformer Engine,
    or both switches at once.
    """
    validate_fp8(config)
    name = getattr(config, "dsv3_fp8_recipe", None)
    if name is not None:
        return FP8Recipe(pow2_scales=RECIPES[name])
    if getattr(config, "fp8", None):
        # the scale choice TE's Float8BlockScaling makes for the TE linears of the same model
        pow2 = os.environ.get("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0") != "1"
        return FP8Recipe(pow2_scales=pow2)
    return None


def fp8_recipe_for_te(recipe: FP8Recipe):
    """Transformer Engine's Float8BlockScaling with our numerics (TE >= 2.3, SM90+, CUDA 12.9+).

    1x128 activations (x_block_scaling_dim=1) and gradients (grad_block_scaling_dim=1), 128x128
    weights (w_block_scaling_dim=2), E4M3, split (FP32) accumulation in all three GEMMs (TE's
    default, which it requires for this recipe). TE takes the float32-vs-power-of-2 choice and the
    amax floor from the QParams class attributes fp8_quant_fwd_inp / fp8_quant_fwd_weight /
    fp8_quant_bwd_grad, computed from NVTE_FP8_BLOCK_SCALING_FP32_SCALES when TE is imported; they
    are not dataclass fields, so no constructor keyword reaches them (`use_f32_scales=` is accepted
    and ignored). We assign new QParams on the instance after construction: power-of-2 as the
    recipe says, amax floor AMAX_FLOOR for activations and weights and GRAD_AMAX_FLOOR for
    gradients, as our emulation quantises (`fp8.gemm`). The class defaults stay untouched.
    """
    from transformer_engine.common.recipe import Float8BlockScaling, Format

    from megatron_dsv3.fp8.quant import AMAX_FLOOR, GRAD_AMAX_FLOOR

    te = Float8BlockScaling(fp8_format=Format.E4M3, x_block_scaling_dim=1,
                            w_block_scaling_dim=2, grad_block_scaling_dim=1)
    floors = {"fp8_quant_fwd_inp": AMAX_FLOOR, "fp8_quant_fwd_weight": AMAX_FLOOR,
              "fp8_quant_bwd_grad": GRAD_AMAX_FLOOR}
    for attr, floor in floors.items():
        qparams_cls = type(getattr(te, attr))
        setattr(te, attr, qparams_cls(power_2_scale=recipe.pow2_scales, amax_epsilon=floor))
    return te
