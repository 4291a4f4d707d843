"""Named presets and `get_config`.

`deepseek-v3` is the 671B model of the technical report (arXiv 2412.19437) and DeepSeek's
config.json; `deepseek-v3-tiny` has the same structure (dense first layer, grouped sigmoid routing,
shared expert, MLA with query compression, YaRN, MTP 1) at a size that trains on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from megatron_dsv3.configs.config import DeepSeekV3Config

# Fields every preset shares: DeepSeek-V3's architecture choices in Megatron's vocabulary.
_COMMON: dict[str, Any] = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    gated_linear_unit=True,  # SwiGLU
    activation_func=F.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    qk_layernorm=True,  # RMSNorm on the query and KV latents
    rope_type="yarn",
    rotary_base=10000,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,  # aux-loss-free balancing
    moe_router_bias_update_rate=1e-3,  # gamma
    moe_router_load_balancing_type="seq_aux_loss",
    moe_aux_loss_coeff=1e-4,  # alpha of the sequence-wise auxiliary loss
    moe_router_dtype="fp32",
    moe_token_dispatcher_type="alltoall",
    moe_grouped_gemm=True,  # routed experts always run as grouped GEMMs

    moe_router_topk_scaling_factor=2.5,
    mtp_num_layers=1,
    mtp_loss_scaling_factor=0.3,  # lambda: 0.3 for the first 10T tokens, then 0.1
    init_method_std=0.006,
)

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": dict(
        _COMMON,
        num_layers=61,
        first_k_dense_replace=3,
        hidden_size=7168,
        ffn_hidden_size=18432,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        num_moe_experts=256,
        moe_ffn_hidden_size=2048,
        moe_shared_expert_intermediate_size=2048,
        moe_router_topk=8,
        moe_router_num_groups=8,
        moe_router_group_topk=4,
        rotary_scaling_factor=40,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
        vocab_size=129280,
        max_position_embeddings=163840,
        bf16=True,
        params_dtype=torch.bfloat16,
    ),
    "deepseek-v3-tiny": dict(
        _COMMON,
        num_layers=3,
        first_k_dense_replace=1,
        hidden_size=64,
        ffn_hidden_size=160,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        num_moe_experts=16,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_router_topk=4,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        rotary_scaling_factor=4,
        original_max_position_embeddings=64,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
        vocab_size=256,  # byte-level
        max_position_embeddings=256,
        init_method_std=0.02,
        moe_router_bias_update_rate=1e-2,
    ),
}


def moe_layer_pattern(num_layers: int, first_k_dense_replace: int) -> list[int]:
    """Megatron's `moe_layer_freq` list for "the first k layers are dense, the rest MoE"."""
    return [0] * first_k_dense_replace + [1] * (num_layers - first_k_dense_replace)


def get_config(name: str, **overrides: Any) -> DeepSeekV3Config:
    """A preset as a `DeepSeekV3Config` (an `MLATransformerConfig`), with field overrides.

    Besides every field of the config, `first_k_dense_replace` (HF's name) may be overridden: it
    sets `moe_layer_freq` to k dense layers followed by MoE layers, also after `num_layers` changes.
    Unknown names raise ValueError listing the allowed ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: allowed values are {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    fields = {f.name for f in dataclasses.fields(DeepSeekV3Config)}
    unknown = sorted(set(overrides) - fields - {"first_k_dense_replace"})
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}: allowed are the fields of "
                         f"DeepSeekV3Config/MLATransformerConfig and 'first_k_dense_replace'")
    values.update(overrides)
    k = values.pop("first_k_dense_replace")
    if "moe_layer_freq" not in overrides:
        if not isinstance(k, int) or not 0 <= k <= values["num_layers"]:
            raise ValueError(f"first_k_dense_replace={k!r} is invalid: allowed values are "
                             f"0..{values['num_layers']} (num_layers)")
        values["moe_layer_freq"] = moe_layer_pattern(values["num_layers"], k)
    if values.get("bf16") and "params_dtype" not in overrides:
        values["params_dtype"] = torch.bfloat16
    values.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    values.setdefault("pipeline_dtype", values.get("params_dtype", torch.float32))
    return DeepSeekV3Config(**values)


def is_moe_layer(config, layer_number: int) -> bool:
    """Whether global layer `layer_number` (1-based, Megatron's numbering) is a DeepSeek-MoE layer.

    Layers past `num_layers` are MTP layers; like DeepSeek's checkpoint, and as vLLM and SGLang
    build them from config.json (their index is past first_k_dense_replace), they use an MoE
    block whenever the model has routed experts, also when every main layer is dense (with an
    integer moe_layer_freq: when their index is a multiple of it).
    """
    if not getattr(config, "num_moe_experts", None):
        return False
    freq = config.moe_layer_freq
    if layer_number > config.num_layers:
        return isinstance(freq, (list, tuple)) or (layer_number - 1) % freq == 0
    pattern = (list(freq) if isinstance(freq, (list, tuple))
               else [1 if i % freq == 0 else 0 for i in range(config.num_layers)])
    return bool(pattern[layer_number - 1])
