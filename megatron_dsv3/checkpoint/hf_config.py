"""DeepSeek-V3's HF config.json <-> our DeepSeekV3Config.

Every architecture field of the HF config is mapped to the Megatron field that holds it; the
training hyper-parameters HF does not carry (bias update speed, aux-loss weight, MTP loss weight,
...) come from the `deepseek-v3` preset. A config our model cannot hold is refused with a ValueError
naming the HF field and the values we accept, before any weight is read.

Both spellings of the RoPE settings are read: transformers 5's `rope_parameters` and DeepSeek's own
`rope_theta` + `rope_scaling` (with `type` or `rope_type`).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, Optional

import torch

from megatron_dsv3.checkpoint.errors import CheckpointFileError, reading
from megatron_dsv3.configs import DeepSeekV3Config, get_config, latent_norm_epsilon

# The parameter dtype a model built from an HF checkpoint gets unless told otherwise: every load
# path (config_from_hf, inference.loading, python -m megatron_dsv3.generate) uses this one default.
DEFAULT_DTYPE = torch.bfloat16

# DeepSeek's FP8 release: E4M3 weights, one float32 `weight_scale_inv` per 128x128 block.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}
SCALE_FORMATS = (None, "ue8m0")  # quantization_config.scale_fmt we read and write back


# The config.json fields without a default: each sets the shape of weights.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                   "v_head_dim", "n_routed_experts", "moe_intermediate_size",
                   "num_experts_per_tok")


# Routing fields whose defaults differ between transformers (these) and DeepSeek's reference code
# (1, 1, 1.0): a config.json must give them.
HF_LATENT_NORM_EPS = 1e-6  # MLA's latent norms in transformers and DeepSeek's reference code
ROUTING_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}


def read_hf_config(path: str) -> Dict[str, Any]:
    """config.json of an HF checkpoint directory (or the path of a config.json itself);
    CheckpointFileError naming the file when it is not JSON or lacks a required field."""
    if not os.path.isfile(path):
        from megatron_dsv3.checkpoint.commit import recover_directory

        # every reader first: a directory an interrupted commit left renamed aside goes back
        recover_directory(path, clean=False)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no HF config at {file!r}: expected a checkpoint directory holding "
                         "config.json, or the path of a config.json")
    with reading(file, "HF config"):
        with open(file) as f:
            hf = json.load(f)
    if not isinstance(hf, dict):
        raise CheckpointFileError(file, f"is not an HF config: expected a JSON object, found a "
                                        f"{type(hf).__name__}")
    if missing_fields(hf):
        raise CheckpointFileError(file, missing_fields(hf))
    return hf


def missing_fields(hf: Dict[str, Any]) -> str:
    """'' or what the config lacks of REQUIRED_FIELDS: "lacks the required field F (and ...)"."""
    missing = [k for k in REQUIRED_FIELDS if hf.get(k) is None]
    if not missing:
        return ""
    return (f"lacks the required field {missing[0]}"
            + (f" (and {', '.join(missing[1:])})" if missing[1:] else ""))


def _refuse(field: str, value: Any, allowed: str, why: str = "") -> None:
    raise ValueError(f"HF config field {field}={value!r} cannot be held by the DeepSeek-V3 model: "
                     f"allowed values are {allowed}" + (f" ({why})" if why else ""))


def rope_settings(hf: Dict[str, Any]) -> Dict[str, Any]:
    """The RoPE dictionary of either spelling, with rope_type and rope_theta filled in."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type", "default")
    rope.pop("type", None)
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return rope


def mtp_depth(hf: Dict[str, Any]) -> int:
    return int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)


def mtp_layers_to_build(path_or_dict, hf: Dict[str, Any], mtp: Optional[bool] = None
                        ) -> Optional[int]:
    """The MTP depth to build for an HF checkpoint (None: no MTP layers).

    DeepSeek's checkpoints hold MTP module k as `model.layers.{L + k}.*` (L = num_hidden_layers,
    k < num_nextn_predict_layers). transformers' DeepseekV3ForCausalLM has no MTP modules, so its
    `save_pretrained` writes none while config.json keeps num_nextn_predict_layers. mtp=None builds
    the config's depth when the checkpoint holds `model.layers.{L}.*` (or when there are no weight
    files next to the config to look at, e.g. a parsed dict) and otherwise leaves MTP out with a
    warning naming the file; mtp=True builds it regardless (load_hf then names the missing
    tensors); mtp=False leaves it out.
    """
    depth = mtp_depth(hf)
    if mtp is False:
        return None
    if depth == 0:
        if mtp:
            raise ValueError("mtp=True, but the HF config sets num_nextn_predict_layers=0: the "
                             "checkpoint describes no MTP layers")
        return None
    if mtp or isinstance(path_or_dict, dict):
        return depth
    from megatron_dsv3.checkpoint.quantized import open_hf_reader
    from megatron_dsv3.checkpoint.safetensors_io import INDEX_FILE, SINGLE_FILE

    directory = path_or_dict if os.path.isdir(path_or_dict) else os.path.dirname(path_or_dict)
    if not any(os.path.isfile(os.path.join(directory, f)) for f in (INDEX_FILE, SINGLE_FILE)):
        return depth  # a config without weights: nothing to detect
    reader = open_hf_reader(directory, hf)
    first = f"model.layers.{hf['num_hidden_layers']}."
    if any(name.startswith(first) for name in reader.names()):
        return depth
    warnings.warn(f"{reader.index_file} holds no MTP weights ({first}*) although its config sets "
                  f"num_nextn_predict_layers={depth} (transformers' save_pretrained writes none): "
                  "loading without MTP; pass mtp=True to insist", stacklevel=3)
    return None


def _check_supported(hf: Dict[str, Any]) -> None:
    checks = [
        ("model_type", hf.get("model_type", "deepseek_v3") == "deepseek_v3", "'deepseek_v3'", ""),
        ("hidden_act", hf.get("hidden_act", "silu") == "silu", "'silu'", "SwiGLU experts"),
        ("attention_bias", not hf.get("attention_bias", False), "false",
         "our MLA projections have no bias"),
        ("tie_word_embeddings", not hf.get("tie_word_embeddings", False), "false",
         "the embedding and the output head are separate weights"),
        ("norm_topk_prob", hf.get("norm_topk_prob", True) is True, "true",
         "routing weights are always normalised before routed_scaling_factor"),
        ("scoring_func", hf.get("scoring_func", "sigmoid") == "sigmoid", "'sigmoid'", ""),
        ("topk_method", hf.get("topk_method", "noaux_tc") == "noaux_tc", "'noaux_tc'",
         "bias-corrected, group-limited top-k"),
        ("moe_layer_freq", hf.get("moe_layer_freq", 1) == 1, "1",
         "DeepSeek-V3 places an MoE block in every layer after the first_k_dense_replace"),
        ("n_routed_experts", isinstance(hf.get("n_routed_experts"), int)
         and hf.get("n_routed_experts", 0) > 0, "a positive integer", ""),
    ]
    for field, ok, allowed, why in checks:
        if not ok:
            _refuse(field, hf.get(field), allowed, why)
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads not in (None, hf["num_attention_heads"]):
        _refuse("num_key_value_heads", kv_heads,
                f"null or num_attention_heads={hf['num_attention_heads']}",
                "MLA expands the latent into one key/value per head")
    quant = hf.get("quantization_config")
    if quant is not None and quant.get("quant_method") == "modelopt":
        from megatron_dsv3.checkpoint.quantized import check_readable

        check_readable(hf)  # a modelopt export (megatron_dsv3.export) we can dequantise
    elif quant is not None:
        for key in ("quant_method", "fmt", "weight_block_size"):
            if quant.get(key, FP8_QUANTIZATION_CONFIG[key]) != FP8_QUANTIZATION_CONFIG[key]:
                _refuse(f"quantization_config.{key}", quant.get(key),
                        repr(FP8_QUANTIZATION_CONFIG[key]), "DeepSeek's 128x128 FP8 blocks")
        if quant.get("scale_fmt") not in SCALE_FORMATS:
            _refuse("quantization_config.scale_fmt", quant.get("scale_fmt"),
                    ", ".join(map(repr, SCALE_FORMATS)),
                    "float32 block scales, or power-of-2 ones (ue8m0)")


def scale_format(hf: Optional[Dict[str, Any]]) -> Optional[str]:
    """The FP8 block scales' format of an HF config: None (float32 amax / 448) or 'ue8m0'
    (powers of 2)."""
    return ((hf or {}).get("quantization_config") or {}).get("scale_fmt")


def _rope_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
    rope = rope_settings(hf)
    kind = rope["rope_type"]
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "1.0")
    fields: Dict[str, Any] = {"rotary_base": float(rope["rope_theta"])}
    if kind == "default":
        return dict(fields, rope_type="rope")
    if kind != "yarn":
        _refuse("rope_parameters.rope_type", kind, "'default', 'yarn'")
    if rope.get("factor") is None:
        _refuse("rope_parameters.factor", None, "a number (YaRN's scaling factor)")
    if rope.get("truncate", True) is not True:
        _refuse("rope_parameters.truncate", rope["truncate"], "true",
                "YaRN's correction range is rounded to whole dimensions, as in DeepSeek's code")
    factor = float(rope["factor"])
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if rope.get("attention_factor") is not None:
        from megatron_dsv3.attention.rope import get_mscale

        implied = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                   if mscale and mscale_all_dim else get_mscale(factor))
        if abs(rope["attention_factor"] - implied) > 1e-12:
            _refuse("rope_parameters.attention_factor", rope["attention_factor"],
                    f"null or {implied} (implied by factor, mscale and mscale_all_dim)")
    # YaRN's attention factor is mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set
    # and mscale(f, 1) otherwise; a missing mscale maps to 0, which selects the same branch.
    return dict(fields, rope_type="yarn", rotary_scaling_factor=factor,
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings")
                    or hf.get("max_position_embeddings", 4096)),
                beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                mscale=float(mscale or 0.0), mscale_all_dim=float(mscale_all_dim or 0.0))


def config_fields_from_hf(hf: Dict[str, Any]) -> Dict[str, Any]:
    """The DeepSeekV3Config fields (and `first_k_dense_replace`) an HF config.json sets."""
    if missing_fields(hf):
        raise ValueError(f"HF config {missing_fields(hf)}")
    _check_supported(hf)
    for key, theirs in ROUTING_DEFAULTS.items():
        if key not in hf:
            raise ValueError(
                f"HF config lacks {key}: transformers would take {theirs}, DeepSeek's reference "
                f"code 1, and the routing differs; give {key} in config.json (DeepSeek-V3: "
                f"n_group 8, topk_group 4, routed_scaling_factor 2.5)")
    experts = hf["n_routed_experts"]
    shared = hf.get("n_shared_experts") or 0
    depth = mtp_depth(hf)
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"),  # null = no query compression
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        num_moe_experts=experts,
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=shared * hf["moe_intermediate_size"] or None,
        moe_router_topk=hf["num_experts_per_tok"],
        moe_router_num_groups=hf.get("n_group") or 1,
        moe_router_group_topk=hf.get("topk_group") or 1,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        # (transformers builds every layer dense when it exceeds the layer count)
        first_k_dense_replace=min(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"]),
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        dsv3_latent_norm_epsilon=HF_LATENT_NORM_EPS,  # hard-coded there, whatever rms_norm_eps
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        mtp_num_layers=depth or None,
        init_method_std=float(hf.get("initializer_range", 0.006)),
    )
    fields.update(_rope_fields(hf))
    return fields


def config_from_hf(path_or_dict, dtype: torch.dtype = DEFAULT_DTYPE, *,
                   mtp: Optional[bool] = None, **overrides: Any) -> DeepSeekV3Config:
    """Our config for an HF DeepSeek-V3 checkpoint (directory, config.json path, or parsed dict).

    `dtype` is the parameter dtype of the model to build: bfloat16 by default (DEFAULT_DTYPE, as
    every load path), float32 for exact comparisons; `overrides` set any other DeepSeekV3Config
    field (parallel sizes, FP8 recipe, training hyper-parameters, or e.g. mtp_num_layers=None to
    leave MTP out). `mtp` decides the
    MTP layers when mtp_num_layers is not overridden (see mtp_layers_to_build: by default they
    are left out, with a warning, when the checkpoint holds none, as after transformers'
    save_pretrained).
    """
    hf = path_or_dict if isinstance(path_or_dict, dict) else read_hf_config(path_or_dict)
    fields = config_fields_from_hf(hf)
    if "mtp_num_layers" not in overrides:
        fields["mtp_num_layers"] = mtp_layers_to_build(path_or_dict, hf, mtp)
    fields.update(bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype)
    fields.update(overrides)
    try:
        return get_config("deepseek-v3", **fields)
    except ValueError as error:
        # name the HF field behind the Megatron field the validation names
        message = str(error)
        for ours, theirs in HF_NAMES.items():
            if message.startswith(ours) and ours not in overrides:
                raise ValueError(f"HF config field {theirs}={hf.get(theirs)!r} cannot be held "
                                 f"(our {ours}): {message}") from error
        raise


# Our field -> the HF config.json field it comes from (for error messages).
HF_NAMES = {
    "moe_router_num_groups": "n_group", "moe_router_group_topk": "topk_group",
    "moe_router_topk": "num_experts_per_tok", "num_moe_experts": "n_routed_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size", "ffn_hidden_size": "intermediate_size",
    "moe_shared_expert_intermediate_size": "n_shared_experts",
    "qk_pos_emb_head_dim": "qk_rope_head_dim", "qk_head_dim": "qk_nope_head_dim",
    "num_layers": "num_hidden_layers", "first_k_dense_replace": "first_k_dense_replace",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "v_head_dim": "v_head_dim",
    "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "vocab_size": "vocab_size", "mtp_num_layers": "num_nextn_predict_layers",
}


def config_to_hf(config, base: Optional[Dict[str, Any]] = None, *, fp8: bool = False,
                 rope_interleave: bool = True) -> Dict[str, Any]:
    """config.json for our config. `base` (the checkpoint's original config.json) keeps the fields
    that are not architecture (token ids, generation defaults, ...); architecture fields are ours.
    RoPE is written in both spellings (transformers 5 and DeepSeek's own code read different ones).
    The base's `auto_map` is dropped: it names remote-code files (DeepSeek's modeling_deepseek.py)
    that are not written next to the result, and the architecture written is transformers' own
    DeepseekV3ForCausalLM (with trust_remote_code a reader would fail to find those files).
    """
    out = {k: v for k, v in (base or {}).items()
           if k not in ("quantization_config", "rope_scaling", "rope_parameters", "torch_dtype",
                        "auto_map")}
    freq = config.moe_layer_freq
    pattern = list(freq) if isinstance(freq, (list, tuple)) else None
    if pattern is None or pattern != sorted(pattern):
        raise ValueError(f"moe_layer_freq={freq!r} cannot be written as HF's first_k_dense_replace: "
                         "allowed values are k dense layers followed by MoE layers")
    latent_eps = latent_norm_epsilon(config)
    if latent_eps != HF_LATENT_NORM_EPS:
        warnings.warn(f"MLA's latent norms use epsilon {latent_eps:g} here; an HF config cannot "
                      f"say so and transformers reads them with {HF_LATENT_NORM_EPS:g} (set "
                      f"dsv3_latent_norm_epsilon={HF_LATENT_NORM_EPS:g} to train what HF runs)",
                      stacklevel=2)
    shared = config.moe_shared_expert_intermediate_size or 0
    if shared % config.moe_ffn_hidden_size:
        raise ValueError(
            f"moe_shared_expert_intermediate_size={shared} must be a multiple of "
            f"moe_ffn_hidden_size={config.moe_ffn_hidden_size} to be written as n_shared_experts")
    rope: Dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rotary_base)}
    if config.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": float(config.rotary_base),
                "factor": float(config.rotary_scaling_factor),
                "original_max_position_embeddings": int(config.original_max_position_embeddings),
                "beta_fast": float(config.beta_fast), "beta_slow": float(config.beta_slow),
                "mscale": float(config.mscale) or None,
                "mscale_all_dim": float(config.mscale_all_dim) or None}
        rope = {k: v for k, v in rope.items() if v is not None}
    legacy = {("type" if k == "rope_type" else k): v for k, v in rope.items() if k != "rope_theta"}
    dtype_name = str(config.params_dtype).replace("torch.", "")
    out.update(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, moe_intermediate_size=config.moe_ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_head_dim, qk_rope_head_dim=config.qk_pos_emb_head_dim,
        v_head_dim=config.v_head_dim,
        n_routed_experts=config.num_moe_experts, n_shared_experts=shared // config.moe_ffn_hidden_size,
        num_experts_per_tok=config.moe_router_topk, n_group=config.moe_router_num_groups or 1,
        topk_group=config.moe_router_group_topk or (config.moe_router_num_groups or 1),
        routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        first_k_dense_replace=pattern.count(0), moe_layer_freq=1,
        rms_norm_eps=config.layernorm_epsilon, max_position_embeddings=config.max_position_embeddings,
        num_nextn_predict_layers=config.mtp_num_layers or 0,
        hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
        initializer_range=config.init_method_std, rope_interleave=rope_interleave,
        rope_parameters=rope, rope_theta=float(config.rotary_base),
        rope_scaling=legacy if config.rope_type == "yarn" else None, dtype=dtype_name,
    )
    if fp8:
        out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        if scale_format(base):  # written with the source's scale format (write_hf)
            out["quantization_config"]["scale_fmt"] = scale_format(base)
    return out
