"""Transformer Engine's FP8 autocast for DeepSeek-V3's recipe on the 'te' GEMM backend.

With `dsv3_gemm_backend` resolving to 'te' (fp8.backends) and `dsv3_fp8_recipe` set, the TE
modules (linears, routed experts' GroupedLinear) run FP8 only inside
`te.pytorch.autocast(enabled=True, recipe=Float8BlockScaling with our numerics)`;
`te_fp8_autocast(config)` is that context (a null context otherwise). The layers of the TE spec
(`layer_specs.TEAutocastLayer`) compute TE's recipe once when built and enter the context around
each half of the layer (attention half, MLP/MoE half: every entry point, DualPipe's split halves
and cached decoding included):

    with te_autocast(self.te_fp8_recipe):
        return super().forward_mlp(hidden_states, padding_mask)

The backward needs no context (TE records the recipe in the forward). What stays in high
precision is what no TE GEMM module owns: the embedding and output head (Megatron's), the router
(a float32 matmul of ours), the norms (elementwise) and the attention core (TE's
DotProductAttention runs FP8 only with the recipe's fp8_dpa, which ours leaves off).
Megatron's own `fp8` switch is left to megatron-core, which enters TE's autocast itself: then
this context stays null. TE is imported only when the context is entered for real.

Not covered on this backend: MTP's eh_proj (a TE linear of the MTP layer, outside its decoder
layer's halves) runs in the compute dtype, not FP8 (the 'emulated' and 'torch' backends run it
in FP8).
"""

from __future__ import annotations

import contextlib

from megatron_dsv3.fp8 import backends
from megatron_dsv3.fp8.recipe import fp8_recipe_for_te, recipe_from_config


def te_fp8_recipe(config):
    """TE's recipe for `config` on the 'te' backend (None: no TE autocast to enter here)."""
    recipe = recipe_from_config(config)
    if recipe is None or getattr(config, "fp8", None):
        return None
    if backends.resolve(config).name != "te":
        return None
    return fp8_recipe_for_te(recipe)


def te_autocast(te_recipe):
    """`te.pytorch.autocast(enabled=True, recipe=te_recipe)` (TE before 2.? spells it
    fp8_autocast(enabled=True, fp8_recipe=...)); a null context for te_recipe None."""
    if te_recipe is None:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=te_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe)


def te_fp8_autocast(config):
    """TE's FP8 autocast for our recipe on the 'te' backend (`te_fp8_recipe`); a null context
    otherwise."""
    return te_autocast(te_fp8_recipe(config))
