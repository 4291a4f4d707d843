"""A stand-in for Transformer Engine's recipe module (TE is GPU-only), with TE 2.x's structure:
`Float8BlockScaling` holds its QParams as class attributes computed at import and accepts a
`use_f32_scales` field that it ignores - so tests on CPU check that our adapter sets what TE
actually reads (megatron_dsv3.fp8.recipe.fp8_recipe_for_te)."""

from __future__ import annotations

import dataclasses
import enum
import types


def te_recipe_module() -> types.ModuleType:
    """A fresh `transformer_engine.common.recipe` stand-in (QParams, Format, Float8BlockScaling);
    fresh classes on every call, so a test can check that nothing changed them."""

    @dataclasses.dataclass(frozen=True)
    class QParams:
        power_2_scale: bool = False
        amax_epsilon: float = 0.0

    class Format(enum.Enum):
        E4M3 = "e4m3"

    @dataclasses.dataclass
    class Float8BlockScaling:
        use_f32_scales: bool = False
        fp8_format: Format = Format.E4M3
        fp8_quant_fwd_inp = QParams(power_2_scale=True)
        fp8_quant_fwd_weight = QParams(power_2_scale=True)
        fp8_quant_bwd_grad = QParams(power_2_scale=True)
        x_block_scaling_dim: int = 1
        w_block_scaling_dim: int = 2
        grad_block_scaling_dim: int = 1

    module = types.ModuleType("transformer_engine.common.recipe")
    module.QParams, module.Format, module.Float8BlockScaling = QParams, Format, Float8BlockScaling
    return module
