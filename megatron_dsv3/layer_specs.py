"""DeepSeek-V3 on Megatron's spec system.

    --spec megatron_dsv3.layer_specs layer_spec      (megatron-core 0.16.1+: a TransformerLayer spec)
    --spec megatron_dsv3.layer_specs get_layer_spec  (0.19+: called as get_layer_spec(config, vp_stage=...))

`layer_spec` is a ModuleSpec of DeepSeekV3TransformerLayer; each layer picks dense MLP or
DeepSeek-MoE from its global layer number, so one spec is right on every pipeline stage.
`get_block_spec(config, vp_stage)` gives this stage's TransformerBlockSubmodules, `block_spec` the
same for the config Megatron-LM parsed (resolved on first access inside Megatron-LM), and
`get_mtp_block_spec(config)` the MTP block. The backend is chosen once: Transformer Engine linears,
norms and core attention when TE imports and CUDA is present, portable torch modules otherwise.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_dsv3 import compat
from megatron_dsv3.attention.core import SDPAttention
from megatron_dsv3.attention.mla import MLASelfAttention, MLASubmodules
from megatron_dsv3.core.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from megatron_dsv3.core.mlp import MLPSubmodules, SwiGLUMLP
from megatron_dsv3.core.norm import RMSNorm
from megatron_dsv3.moe.experts import GroupedExperts
from megatron_dsv3.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules
from megatron_dsv3.moe.router import SigmoidGroupRouter
from megatron_dsv3.mtp.layer import mtp_block_spec
from megatron_dsv3.transformer_layer import DeepSeekV3LayerSubmodules, DeepSeekV3TransformerLayer


@functools.lru_cache(maxsize=None)
def backend(use_te: Optional[bool] = None) -> SimpleNamespace:
    """The module classes of one backend: 'te' (Transformer Engine) or 'local' (portable torch)."""
    if use_te is None:
        use_te = compat.use_transformer_engine()
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TELinear,
            TENorm,
            TERowParallelLinear,
        )

        return SimpleNamespace(
            name="te", column=TEColumnParallelLinear, row=TERowParallelLinear,
            replicated=ModuleSpec(module=TELinear, params={"parallel_mode": "duplicated"}),
            norm=TENorm, core_attention=TEDotProductAttention)
    return SimpleNamespace(name="local", column=ColumnParallelLinear, row=RowParallelLinear,
                           replicated=ReplicatedLinear, norm=RMSNorm, core_attention=SDPAttention)


def get_layer_spec(config=None, vp_stage: Optional[int] = None, *, use_te: Optional[bool] = None,
                   dispatcher=None) -> ModuleSpec:
    """ModuleSpec of the DeepSeek-V3 decoder layer. `config` and `vp_stage` follow megatron-core
    0.19's callable-spec convention (the spec itself does not depend on them). `dispatcher`
    fixes the token dispatcher class; by default each MoE layer picks one from its expert-parallel
    group (see `moe.dispatcher.default_dispatcher`)."""
    b = backend(use_te)
    attention = ModuleSpec(
        module=MLASelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASubmodules(
            linear_q_proj=b.column, linear_q_down_proj=b.replicated, q_layernorm=b.norm,
            linear_q_up_proj=b.column, linear_kv_down_proj=b.replicated, kv_layernorm=b.norm,
            linear_kv_up_proj=b.column, core_attention=b.core_attention, linear_proj=b.row))
    mlp = ModuleSpec(module=SwiGLUMLP, submodules=MLPSubmodules(linear_fc1=b.column,
                                                                linear_fc2=b.row))
    moe = ModuleSpec(module=DeepSeekMoE, submodules=DeepSeekMoESubmodules(
        router=SigmoidGroupRouter, experts=GroupedExperts, shared_experts=mlp,
        dispatcher=dispatcher))
    return ModuleSpec(module=DeepSeekV3TransformerLayer, submodules=DeepSeekV3LayerSubmodules(
        input_layernorm=b.norm, self_attention=attention, pre_mlp_layernorm=b.norm,
        dense_mlp=mlp, moe=moe))


def get_block_spec(config, vp_stage: Optional[int] = None, *, pp_rank: Optional[int] = None,
                   use_te: Optional[bool] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers (Megatron's split) with our final RMSNorm."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    n = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(layer_specs=[get_layer_spec(config, vp_stage, use_te=use_te)] * n,
                                      layer_norm=backend(use_te).norm)


def get_mtp_block_spec(config, layer_spec: Optional[ModuleSpec] = None,
                       use_te: Optional[bool] = None) -> Optional[ModuleSpec]:
    """MTP block for `config.mtp_num_layers` depths (None without MTP)."""
    if not config.mtp_num_layers:
        return None
    b = backend(use_te)
    return mtp_block_spec(config, layer_spec or get_layer_spec(config, use_te=use_te), b.norm,
                          b.column)


layer_spec = get_layer_spec()


def __getattr__(name):
    # `block_spec` depends on the parsed model config: resolve it from Megatron-LM's arguments.
    if name == "block_spec":
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args

        from megatron.core.transformer.transformer_config import MLATransformerConfig

        args = get_args()
        return get_block_spec(core_transformer_config_from_args(args, MLATransformerConfig))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
