"""DeepSeek-V3 on Megatron's spec system.

    --spec megatron_dsv3.layer_specs layer_spec      (megatron-core 0.16.1 .. 0.19.x)

`layer_spec` is a ModuleSpec of DeepSeekV3TransformerLayer; each layer picks dense MLP or
DeepSeek-MoE from its global layer number, so one spec is right on every pipeline stage.
`get_block_spec(config, vp_stage)` gives this stage's TransformerBlockSubmodules, `block_spec` the
same for the config Megatron-LM parsed (resolved from megatron.training's arguments on attribute
access, getattr(layer_specs, "block_spec"); not through `--spec`, see below), and
`get_mtp_block_spec(config)` the MTP block. The backend is chosen once: Transformer Engine
linears, norms and core attention when TE imports and CUDA is present, portable torch modules
otherwise.

What `--spec A B` gets, in Megatron-LM core_v0.16.1 and core_v0.19.0 alike: `gpt_builders.py`,
`gpt_builder`, sets `transformer_layer_spec = import_module(args.spec)`, and
`megatron/core/transformer/spec_utils.py`, `import_module`, returns `vars(module)[B]`: the object
itself, never called (a factory such as `get_layer_spec` reaches TransformerBlock's
`_get_block_submodules`, which accepts only a ModuleSpec or TransformerBlockSubmodules), and
`vars()` does not see `block_spec` (KeyError): pass `layer_spec`. core_v0.19.0 calls a
callable spec only in its new Python builder API, `megatron/training/models/gpt.py`,
`GPTModelBuilder.build_model`: a callable `GPTModelConfig.transformer_layer_spec` is called as
`spec(model_config, vp_stage=vp_stage)` when it takes `vp_stage`, else `spec(model_config)`
(`model_config` is the GPTModelConfig, which forwards TransformerConfig fields);
`get_layer_spec(config, vp_stage)` has that signature.

The plugins are chosen here too and handed down through the specs: `gemm_strategy` (each GEMM-owning
module's `Gemm`, e.g. FP8, on the GEMM backend `gemm_backend` resolves from
`config.dsv3_gemm_backend`), `RoutedExperts` (the routed experts of that backend),
`TEAutocastLayer` (the TE spec's layer: TE's FP8 autocast with our recipe around each half) and
`make_dispatcher` (each MoE layer's token dispatcher). docs/backends.md has the table.
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
from megatron_dsv3.core.gemm import DEFAULT_GEMM, Gemm
from megatron_dsv3.core.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from megatron_dsv3.core.mlp import MLPSubmodules, SwiGLUMLP
from megatron_dsv3.core.norm import RMSNorm
from megatron_dsv3.dispatch.base import LocalDispatcher, TokenDispatcher
from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher
from megatron_dsv3.dispatch.node_aware import NodeAwareDispatcher
from megatron_dsv3.fp8 import backends
from megatron_dsv3.fp8.recipe import recipe_from_config
from megatron_dsv3.fp8.te_autocast import te_autocast, te_fp8_recipe
from megatron_dsv3.fp8.torch_gemm import TorchBlockwiseGemm
from megatron_dsv3.moe.experts import GroupedExperts
from megatron_dsv3.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules
from megatron_dsv3.moe.router import SigmoidGroupRouter
from megatron_dsv3.mtp.layer import mtp_block_spec
from megatron_dsv3.transformer_layer import DeepSeekV3LayerSubmodules, DeepSeekV3TransformerLayer


def gemm_backend(config) -> backends.BackendChoice:
    """The GEMM backend for `config.dsv3_gemm_backend` on this machine (None: auto), logged once
    with its reason; ValueError naming the field when the requested one cannot run here
    (`fp8.backends.choose_backend`)."""
    return backends.resolve(config)


def gemm_strategy(config) -> Gemm:
    """The GEMM strategy of one module built with `config`: the single place where a GEMM strategy
    is chosen. The specs hand this function (as the `gemm` param) to our linears (local backend)
    and to the routed experts (GroupedExperts); each module calls it once when it is built, so
    each owns its own Gemm.

    Without an FP8 recipe: plain GEMMs (torch._grouped_mm for BF16 experts where it runs). With
    DeepSeek's recipe (`dsv3_fp8_recipe`, or Megatron's `fp8` with fp8_recipe='blockwise';
    `fp8.recipe.recipe_from_config`), by GEMM backend (`gemm_backend`): 'emulated' ->
    `fp8.gemm.Fp8BlockwiseGemm`, 'torch' -> `fp8.torch_gemm.TorchBlockwiseGemm` (torch's
    blockwise scaled_mm). 'te' runs TE modules, which take no Gemm; a module of ours built on a
    'te' machine all the same (a local spec there) gets the best of 'torch' and 'emulated'.
    """
    choice = gemm_backend(config)
    recipe = recipe_from_config(config)
    if recipe is None:
        return DEFAULT_GEMM
    name = choice.name
    if name == "te":  # available_backends: {backend: why it cannot run here, '' if it can}
        name = "emulated" if backends.available_backends()["torch"] else "torch"
    if name == "torch":
        return TorchBlockwiseGemm(recipe.pow2_scales)
    return recipe.gemm()


class RoutedExperts:
    """The routed experts of a spec: `moe.te_experts.TEGroupedExperts` (TE's grouped GEMM) when
    the spec's modules are TE's (`te_spec`) and the GEMM backend is 'te', else
    `moe.experts.GroupedExperts` with `gemm` (gemm_strategy). Building it builds the chosen class
    (same arguments, same experts and checkpoint keys)."""

    def __new__(cls, config, *args, te_spec: bool = False, gemm=None, **kwargs):
        if te_spec and gemm_backend(config).name == "te":
            from megatron_dsv3.moe.te_experts import TEGroupedExperts

            return TEGroupedExperts(config, *args, **kwargs)
        return GroupedExperts(config, *args, gemm=gemm, **kwargs)


class TEAutocastLayer(DeepSeekV3TransformerLayer):
    """The decoder layer of the TE spec: each half runs inside `te.pytorch.autocast` with TE's
    version of our FP8 recipe when the config asks for it on the 'te' GEMM backend
    (`fp8.te_autocast.te_fp8_recipe`, computed once here; None: a null context, the layer is
    DeepSeekV3TransformerLayer's)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.te_fp8_recipe = te_fp8_recipe(config)
        if self.te_fp8_recipe is None and getattr(config, "dsv3_fp8_recipe", None) \
                and not getattr(config, "fp8", None):
            raise ValueError(
                f"the Transformer Engine spec runs dsv3_fp8_recipe={config.dsv3_fp8_recipe!r} in "
                f"its linears only on the 'te' GEMM backend; here it is "
                f"{gemm_backend(config).name!r}, so they would run in BF16 beside FP8 routed "
                "experts. Allowed: dsv3_gemm_backend='te' (or None where TE runs the recipe) with "
                "the TE spec, or our modules' spec (use_te=False) with 'torch' or 'emulated'")

    def _attention_half(self, hidden_states, attend):
        with te_autocast(self.te_fp8_recipe):
            return super()._attention_half(hidden_states, attend)

    def forward_mlp(self, hidden_states, padding_mask=None):
        with te_autocast(self.te_fp8_recipe):
            return super().forward_mlp(hidden_states, padding_mask)


def dispatcher_class(config, ep_group) -> type:
    """LocalDispatcher without expert parallelism; with it, `config.dsv3_dispatcher`'s choice:
    the node-aware dispatcher (default) or the flat all-to-all ('local' is refused with expert
    parallelism when the config is validated)."""
    if ep_group is None or ep_group.size() == 1:
        return LocalDispatcher
    if getattr(config, "dsv3_dispatcher", "node-aware") == "flat":
        return FlatAllToAllDispatcher
    return NodeAwareDispatcher


def make_dispatcher(config, ep_group, cls: Optional[type] = None) -> TokenDispatcher:
    """The token dispatcher of one MoE layer over `ep_group` (None: no expert parallelism):
    `cls`, by default `dispatcher_class(config, ep_group)`, built with the expert count, the
    routing facts and the dispatch options it takes, read from `config`. The default of
    `DeepSeekMoESubmodules.dispatcher` in our specs."""
    cls = cls or dispatcher_class(config, ep_group)
    if issubclass(cls, NodeAwareDispatcher):
        return cls(config.num_moe_experts, ep_group, hidden_size=config.hidden_size,
                   num_groups=config.moe_router_num_groups,
                   group_topk=config.moe_router_group_topk,
                   chunks=getattr(config, "dsv3_dispatch_chunks", 2),
                   fp8_payload=getattr(config, "dsv3_dispatch_fp8", False),
                   expert_tensor_parallel_size=getattr(config, "expert_tensor_parallel_size",
                                                       None) or 1)
    if issubclass(cls, FlatAllToAllDispatcher):
        return cls(config.num_moe_experts, ep_group, hidden_size=config.hidden_size,
                   fp8_payload=getattr(config, "dsv3_dispatch_fp8", False))
    if issubclass(cls, LocalDispatcher):
        return cls(config.num_moe_experts)
    raise TypeError(f"make_dispatcher cannot build {cls.__name__}: allowed classes are "
                    "LocalDispatcher, FlatAllToAllDispatcher, NodeAwareDispatcher (and their "
                    "subclasses); for another dispatcher pass a factory (config, ep_group) -> "
                    "TokenDispatcher as get_layer_spec(dispatcher=...)")


def _use_te(config, use_te: Optional[bool]) -> Optional[bool]:
    """`use_te` as given; unset, TE's modules unless the config asks for a GEMM backend of ours
    ('emulated', 'torch'), which our modules run (on a TE machine too), or its FP8 recipe needs
    a backend of ours here (TE present, but its block scaling cannot run on this GPU: auto then
    picks ours, and TE's linears would run in BF16 beside FP8 experts)."""
    if use_te is not None or config is None:
        return use_te
    requested = getattr(config, "dsv3_gemm_backend", None)
    if requested in ("emulated", "torch"):
        return False
    if requested is None and getattr(config, "dsv3_fp8_recipe", None) \
            and compat.use_transformer_engine() and gemm_backend(config).name != "te":
        return False
    return use_te


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
    ours = {"gemm": gemm_strategy}
    return SimpleNamespace(
        name="local", column=ModuleSpec(module=ColumnParallelLinear, params=ours),
        row=ModuleSpec(module=RowParallelLinear, params=ours),
        replicated=ModuleSpec(module=ReplicatedLinear, params=ours),
        norm=RMSNorm, core_attention=SDPAttention)


def get_layer_spec(config=None, vp_stage: Optional[int] = None, *, use_te: Optional[bool] = None,
                   dispatcher=None) -> ModuleSpec:
    """ModuleSpec of the DeepSeek-V3 decoder layer. `config` and `vp_stage` follow megatron-core
    0.19's callable-spec convention; the spec depends on the config only through
    `dsv3_gemm_backend` ('emulated' / 'torch': our modules even where TE imports). `dispatcher`
    fixes the token dispatcher: a class `make_dispatcher` builds, or a factory
    (config, ep_group) -> TokenDispatcher; by default each MoE layer gets `make_dispatcher`'s
    choice for its expert-parallel group."""
    b = backend(_use_te(config, use_te))
    if dispatcher is None:
        dispatcher = make_dispatcher
    elif isinstance(dispatcher, type):
        dispatcher = functools.partial(make_dispatcher, cls=dispatcher)
    attention = ModuleSpec(
        module=MLASelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASubmodules(
            linear_q_proj=b.column, linear_q_down_proj=b.replicated, q_layernorm=b.norm,
            linear_q_up_proj=b.column, linear_kv_down_proj=b.replicated, kv_layernorm=b.norm,
            linear_kv_up_proj=b.column, core_attention=b.core_attention, linear_proj=b.row))
    mlp = ModuleSpec(module=SwiGLUMLP, submodules=MLPSubmodules(linear_fc1=b.column,
                                                                linear_fc2=b.row))
    moe = ModuleSpec(module=DeepSeekMoE, submodules=DeepSeekMoESubmodules(
        router=SigmoidGroupRouter, shared_experts=mlp, dispatcher=dispatcher,
        experts=ModuleSpec(module=RoutedExperts,
                           params={"gemm": gemm_strategy, "te_spec": b.name == "te"})))
    layer = TEAutocastLayer if b.name == "te" else DeepSeekV3TransformerLayer
    return ModuleSpec(module=layer, submodules=DeepSeekV3LayerSubmodules(
        input_layernorm=b.norm, self_attention=attention, pre_mlp_layernorm=b.norm,
        dense_mlp=mlp, moe=moe))


def get_block_spec(config, vp_stage: Optional[int] = None, *, pp_rank: Optional[int] = None,
                   use_te: Optional[bool] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers (Megatron's split) with our final RMSNorm."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    n = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(layer_specs=[get_layer_spec(config, vp_stage, use_te=use_te)] * n,
                                      layer_norm=norm_spec(config, use_te=use_te))


def norm_spec(config=None, *, use_te: Optional[bool] = None):
    """The RMSNorm class of the layers' backend (the block's final norm must be the same one;
    Megatron's default for a layer spec's block is its LayerNormImpl, torch's RMSNorm without
    Transformer Engine or apex)."""
    return backend(_use_te(config, use_te)).norm


def get_mtp_block_spec(config, layer_spec: Optional[ModuleSpec] = None,
                       use_te: Optional[bool] = None) -> Optional[ModuleSpec]:
    """MTP block for `config.mtp_num_layers` depths (None without MTP)."""
    if not config.mtp_num_layers:
        return None
    b = backend(_use_te(config, use_te))
    return mtp_block_spec(config, layer_spec or get_layer_spec(config, use_te=use_te), b.norm,
                          b.column)


def _megatron_lm_impl() -> Optional[bool]:
    """False when Megatron-LM's parsed arguments say `--transformer-impl local` (route a imports
    this module from `--spec` after parsing them), else None (the automatic choice)."""
    from megatron_dsv3.upstream_flags import megatron_lm_args

    args = megatron_lm_args()
    return False if getattr(args, "transformer_impl", None) == "local" else None


layer_spec = get_layer_spec(use_te=_megatron_lm_impl())


def __getattr__(name):
    # `block_spec` depends on the parsed model config: resolve it from Megatron-LM's arguments.
    if name == "block_spec":
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args

        from megatron.core.transformer.transformer_config import MLATransformerConfig

        args = get_args()
        return get_block_spec(core_transformer_config_from_args(args, MLATransformerConfig))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
