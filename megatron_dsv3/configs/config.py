"""The config class and the validation every module of ours runs at configuration time."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_dsv3 import compat
from megatron_dsv3.configs.layout import is_int
from megatron_dsv3.upstream_flags import check_upstream_flags, is_finite_number


@dataclasses.dataclass
class DeepSeekV3Config(MLATransformerConfig):
    """MLATransformerConfig plus the few facts Megatron keeps elsewhere.

    Validation of the DeepSeek-specific constraints runs before Megatron's own, so a bad value is
    reported with its field name and allowed values instead of as an assertion deep in Megatron.
    """

    vocab_size: int = 129280
    """Vocabulary size (Megatron-LM passes it to GPTModel separately; we keep it with the model)."""

    max_position_embeddings: int = 4096
    """Longest sequence the model is built for (GPTModel's max_sequence_length)."""

    dsv3_fp8_recipe: Optional[str] = None
    """DeepSeek-V3's fine-grained FP8 recipe in our linear layers: None (off), 'deepseek'
    (E4M3, 1x128 activation/gradient tiles, 128x128 weight blocks, float32 scales) or
    'deepseek-pow2' (the same with power-of-2 scales). Portable emulation on any device; see
    megatron_dsv3.fp8.recipe for Transformer Engine's Float8BlockScaling path."""

    dsv3_dispatcher: str = "node-aware"
    """Expert parallelism: the token dispatcher of the MoE layers when expert_model_parallel_size
    > 1: 'node-aware' (two-stage, each token once per destination node) or 'flat' (one
    all-to-all over the expert-parallel group, the baseline). Without expert parallelism every
    choice runs the local dispatcher ('local' is only allowed there)."""

    dsv3_dispatch_chunks: int = 2
    """Expert parallelism: chunks the node-aware dispatcher pipelines, so that one chunk's
    inter-node all-to-all, another's intra-node all-to-all and a third's experts overlap."""

    dsv3_dispatch_fp8: bool = False
    """Expert parallelism: send the dispatch payload in E4M3 with power-of-2 1x128 scales
    (the combine stays in the compute dtype), as DeepSeek-V3 does; both the node-aware and the
    flat dispatcher. With dsv3_fp8_recipe='deepseek' (float32 scales) the routed experts then
    quantise those rows a second time; 'deepseek-pow2' reproduces the payload's values
    exactly (not always its codes: a tile whose largest value rounds down re-scales)."""

    dsv3_gemm_backend: Optional[str] = None
    """Who runs the GEMMs of our layers: None (auto: 'te' where Transformer Engine imports and CUDA
    is present, with an FP8 recipe on SM >= 9.0 and CUDA >= 12.9 only, else 'torch' on Hopper (SM
    9.x, CUDA >= 12.9, torch >= 2.10), else 'emulated'), 'emulated' (torch GEMMs; the FP8 recipe
    quantised, dequantised and multiplied in float32, on any device), 'torch' (the FP8 recipe on
    torch's blockwise-scaled F.scaled_mm; BF16 experts through torch._grouped_mm) or 'te'
    (Transformer Engine modules, routed experts through TE's GroupedLinear, the FP8 recipe as TE's
    Float8BlockScaling). A backend that cannot run on this machine is refused when the model is
    built (megatron_dsv3.fp8.backends). The trainer and generate take it through their config
    overrides, e.g. TrainArgs(config_overrides={"dsv3_gemm_backend": "torch"})."""

    dsv3_latent_norm_epsilon: Optional[float] = None
    """Epsilon of MLA's two latent RMSNorms (the compressed query and key-value): None takes
    layernorm_epsilon, as Megatron's MLA does; DeepSeek's reference code and transformers use
    1e-6 there whatever rms_norm_eps is, so a model read from an HF config sets 1e-6."""

    init_seed: int = 1234
    """Seed of the layout-independent weight initialisation: each weight (and each expert) draws
    from its own generator keyed by this seed and the weight's global name, so a model split over
    any tensor-, pipeline- or expert-parallel layout starts from the same numbers."""

    def __post_init__(self):
        validate_config(self)
        super().__post_init__()
        if self.expert_tensor_parallel_size not in (1, None):
            # (Megatron's __post_init__ gives an unset one tensor_model_parallel_size)
            raise ValueError(
                f"expert_tensor_parallel_size={self.expert_tensor_parallel_size} is invalid: "
                "allowed values are 1 (experts are split by expert parallelism only); Megatron "
                "gives an unset one tensor_model_parallel_size="
                f"{self.tensor_model_parallel_size}: pass expert_tensor_parallel_size=1 "
                "(--expert-tensor-parallel-size 1)")


def latent_norm_epsilon(config: Any) -> float:
    """Epsilon of MLA's latent norms: `dsv3_latent_norm_epsilon`, or layernorm_epsilon where it
    is None or absent (Megatron-LM's own config)."""
    eps = getattr(config, "dsv3_latent_norm_epsilon", None)
    return config.layernorm_epsilon if eps is None else eps


DISPATCHERS = ("node-aware", "flat", "local")
FP8_RECIPES = ("deepseek", "deepseek-pow2")  # dsv3_fp8_recipe: float32 or power-of-2 scales
GEMM_BACKENDS = ("emulated", "torch", "te")  # dsv3_gemm_backend (None: auto)


def _positive(config: Any, field: str, *, optional: bool = False) -> None:
    value = getattr(config, field, None)
    if value is None and optional:
        return
    if not is_int(value) or value <= 0:
        allowed = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{field}={value!r} is invalid: allowed values are {allowed}")


def _number(config: Any, field: str, low: float, *, low_open: bool = False,
            high: Optional[float] = None, high_open: bool = False,
            optional: bool = False) -> None:
    """`field` (when the config has it) a finite number (not a bool) in the range; None too
    when `optional`."""
    if not hasattr(config, field):
        return
    value = getattr(config, field)
    if value is None and optional:
        return
    if (not is_finite_number(value) or (value <= low if low_open else value < low)
            or (high is not None and (value >= high if high_open else value > high))):
        allowed = (f"finite numbers {'>' if low_open else '>='} {low}" if high is None else
                   f"finite numbers in {'(' if low_open else '['}{low}, {high}"
                   f"{')' if high_open else ']'}")
        raise ValueError(f"{field}={value!r} is invalid: allowed values are {allowed}"
                         f"{' or None' if optional else ''}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_fp8(config: Any) -> None:
    """The FP8 fields our linear layers can run: dsv3_fp8_recipe in FP8_RECIPES, or Megatron's
    `fp8='e4m3'` with fp8_recipe='blockwise' where Transformer Engine imports (megatron-core's FP8
    is TE's autocast: without TE it runs dense layers in high precision and fails for MoE), not
    both: Megatron's switch drives the TE linears with its own recipe and ours would drive the
    routed experts, two recipes in one model."""
    name = getattr(config, "dsv3_fp8_recipe", None)
    if name is not None and name not in FP8_RECIPES:
        raise ValueError(f"dsv3_fp8_recipe={name!r} is invalid: allowed values are None, "
                         f"{', '.join(repr(r) for r in FP8_RECIPES)}")
    fp8 = getattr(config, "fp8", None)
    if not fp8:
        return
    if name is not None:
        raise ValueError(
            f"dsv3_fp8_recipe={name!r} and fp8={fp8!r} are both set: Megatron's fp8 would run "
            "the Transformer Engine layers with its recipe and dsv3_fp8_recipe the routed experts. "
            "Allowed: one of them - dsv3_fp8_recipe alone (our layers, and TE's autocast with the "
            "same numerics on the 'te' GEMM backend), or fp8='e4m3' with fp8_recipe='blockwise' "
            "and dsv3_fp8_recipe=None")
    if not compat.te_importable():
        raise ValueError(
            f"fp8={fp8!r} needs Transformer Engine, which is not importable here "
            "(megatron-core's FP8 is TE's autocast: without TE it runs dense layers in high "
            "precision and fails for MoE). Allowed here: fp8=None with "
            f"dsv3_fp8_recipe in {list(FP8_RECIPES)} (DeepSeek's recipe, portable emulation)")
    if fp8 != "e4m3":
        raise ValueError(f"fp8={fp8!r} is not DeepSeek's format: allowed value with megatron-dsv3 "
                         "layers is 'e4m3' (E4M3 for every GEMM input, gradients included; our "
                         "routed experts run it), or fp8=None with dsv3_fp8_recipe")
    recipe = str(getattr(config, "fp8_recipe", ""))
    if "blockwise" not in recipe:
        raise ValueError(f"fp8_recipe={recipe!r} is not DeepSeek's fine-grained recipe: "
                         "allowed value with megatron-dsv3 layers is 'blockwise' (or set "
                         "fp8=None and use dsv3_fp8_recipe)")


def validate_config(config: Any) -> None:
    """Raise ValueError naming the field and its allowed values for any configuration our
    modules cannot build. Works on any Megatron TransformerConfig (ours or Megatron-LM's)."""
    if not getattr(config, "multi_latent_attention", False) and not hasattr(config, "kv_lora_rank"):
        raise ValueError("multi_latent_attention=False: our layers are MLA (DeepSeek-V3), and "
                         "Megatron-LM builds a plain TransformerConfig, without the MLA fields "
                         "(--kv-lora-rank, --q-lora-rank, ...), unless told otherwise: pass "
                         "--multi-latent-attention (allowed value: True)")
    for field in ("num_layers", "hidden_size", "num_attention_heads", "kv_lora_rank",
                  "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        _positive(config, field)
    for field in ("q_lora_rank", "ffn_hidden_size", "num_moe_experts", "moe_ffn_hidden_size",
                  "moe_shared_expert_intermediate_size", "mtp_num_layers"):
        _positive(config, field, optional=True)
    if getattr(config, "vocab_size", 1) is not None:
        _positive(config, "vocab_size", optional=True)
    # parallel sizes before anything divides by them; max_position_embeddings is ours (Megatron's
    # TransformerConfig keeps it outside the config)
    for field in ("tensor_model_parallel_size", "expert_model_parallel_size",
                  "pipeline_model_parallel_size", "max_position_embeddings"):
        if hasattr(config, field):
            _positive(config, field)
    _number(config, "layernorm_epsilon", 0, low_open=True)
    _number(config, "dsv3_latent_norm_epsilon", 0, low_open=True, optional=True)
    _number(config, "init_method_std", 0)
    _number(config, "embedding_init_method_std", 0, optional=True)
    for field in ("hidden_dropout", "attention_dropout"):
        _number(config, field, 0, high=1, high_open=True)
    _number(config, "mtp_loss_scaling_factor", 0,
            optional=not getattr(config, "mtp_num_layers", None))
    if config.qk_pos_emb_head_dim % 2:
        raise ValueError(
            f"qk_pos_emb_head_dim={config.qk_pos_emb_head_dim} is invalid: RoPE needs an even "
            "dimension (allowed values: positive even integers)")
    if getattr(config, "sequence_parallel", False):
        raise ValueError("sequence_parallel=True is not supported by megatron-dsv3 modules "
                         "(allowed values: False); DeepSeek-V3 trains without tensor parallelism")
    tp = getattr(config, "tensor_model_parallel_size", 1)
    if config.num_attention_heads % tp:
        raise ValueError(
            f"num_attention_heads={config.num_attention_heads} must be divisible by "
            f"tensor_model_parallel_size={tp}; allowed tensor_model_parallel_size values: "
            f"{_divisors(config.num_attention_heads)}")
    # what our tensor-parallel layers split: the dense MLP's and the shared expert's hidden
    # sizes, and the vocabulary (embedding and head); caught here, not as a size error when the
    # layer is built
    for field in ("ffn_hidden_size", "moe_shared_expert_intermediate_size", "vocab_size"):
        size = getattr(config, field, None)
        if isinstance(size, int) and tp > 1 and size % tp:
            raise ValueError(f"{field}={size} is invalid: allowed values are multiples of "
                             f"tensor_model_parallel_size={tp}, which splits it (or a "
                             f"tensor_model_parallel_size among {_divisors(size)})")
    dispatcher = getattr(config, "dsv3_dispatcher", "node-aware")
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dsv3_dispatcher={dispatcher!r} is invalid: allowed values are "
                         f"{', '.join(DISPATCHERS)}")
    if dispatcher == "local" and (getattr(config, "expert_model_parallel_size", 1) or 1) > 1:
        raise ValueError("dsv3_dispatcher='local' cannot reach experts on other ranks: allowed "
                         "with expert_model_parallel_size=1 only; use 'node-aware' or 'flat' "
                         f"(expert_model_parallel_size={config.expert_model_parallel_size})")
    validate_fp8(config)
    check_upstream_flags(config)  # Megatron flags: honoured with its meaning or refused
    gemm_backend = getattr(config, "dsv3_gemm_backend", None)
    if gemm_backend is not None and gemm_backend not in GEMM_BACKENDS:
        raise ValueError(f"dsv3_gemm_backend={gemm_backend!r} is invalid: allowed values are None "
                         f"(auto), {', '.join(repr(b) for b in GEMM_BACKENDS)}")
    chunks = getattr(config, "dsv3_dispatch_chunks", 1)
    if not is_int(chunks) or chunks <= 0:
        raise ValueError(f"dsv3_dispatch_chunks={chunks!r} is invalid: allowed values are "
                         "positive integers")
    payload = getattr(config, "dsv3_dispatch_fp8", False)
    if not isinstance(payload, bool):
        raise ValueError(f"dsv3_dispatch_fp8={payload!r} is invalid: allowed values are True, "
                         "False")
    if getattr(config, "rope_type", "yarn") not in ("rope", "yarn"):
        raise ValueError(f"rope_type={config.rope_type!r} is invalid: allowed values are 'rope', 'yarn'")
    validate_rope(config)

    experts = getattr(config, "num_moe_experts", None)
    if not experts:
        return
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, (list, tuple)):
        if len(freq) != config.num_layers or any(v not in (0, 1) for v in freq):
            raise ValueError(
                f"moe_layer_freq has {len(freq)} entries {list(freq)[:8]}...; allowed: a list of "
                f"num_layers={config.num_layers} entries, each 0 (dense) or 1 (MoE)")
    elif not isinstance(freq, int) or freq <= 0:
        raise ValueError(f"moe_layer_freq={freq!r} is invalid: allowed values are a positive "
                         "integer or a list of 0/1 per layer")
    if getattr(config, "moe_router_score_function", "sigmoid") != "sigmoid":
        raise ValueError(f"moe_router_score_function={config.moe_router_score_function!r} is not "
                         "supported: allowed values are 'sigmoid' (DeepSeek-V3 gating)")
    groups = getattr(config, "moe_router_num_groups", None) or 1
    if not is_int(groups) or groups <= 0:
        raise ValueError(f"moe_router_num_groups={groups!r} is invalid: allowed values are a "
                         f"positive divisor of num_moe_experts={experts}: {_divisors(experts)}")
    if experts % groups:
        raise ValueError(
            f"moe_router_num_groups={groups} must divide num_moe_experts={experts}; allowed "
            f"values: {_divisors(experts)}")
    group_topk = getattr(config, "moe_router_group_topk", None) or groups
    if not is_int(group_topk) or not 1 <= group_topk <= groups:
        raise ValueError(
            f"moe_router_group_topk={group_topk!r} is invalid: allowed values are 1.."
            f"{groups} (moe_router_num_groups)")
    topk = config.moe_router_topk
    kept = group_topk * (experts // groups)
    if not is_int(topk) or not 1 <= topk <= kept:
        raise ValueError(
            f"moe_router_topk={topk!r} is invalid: a token can only choose among the {kept} experts "
            f"of its {group_topk} kept groups; allowed values: 1..{kept}")
    ep = getattr(config, "expert_model_parallel_size", 1)
    if experts % ep:
        raise ValueError(
            f"num_moe_experts={experts} must be divisible by expert_model_parallel_size={ep}; "
            f"allowed expert_model_parallel_size values: {_divisors(experts)}")
    if getattr(config, "expert_tensor_parallel_size", 1) not in (1, None):
        raise ValueError(
            f"expert_tensor_parallel_size={config.expert_tensor_parallel_size} is not supported: "
            "allowed values are 1 (experts are split by expert parallelism only)")
    # (moe_aux_loss_coeff, moe_z_loss_coeff and moe_input_jitter_eps: check_upstream_flags)
    _number(config, "moe_router_bias_update_rate", 0)
    _number(config, "moe_router_topk_scaling_factor", 0, low_open=True, optional=True)


def check_megatron_rope_reading(config: Any) -> None:
    """ValueError where Megatron's own MLA reads a Megatron-LM config's RoPE flags differently
    from our layers (route a: its TransformerConfig; route b, megatron_dsv3.pretrain_gpt: the
    config built from its arguments). Our presets and HF checkpoints have transformers' meaning
    and are not checked."""
    factor = getattr(config, "rotary_scaling_factor", 1.0) or 1.0
    mscale, all_dim = getattr(config, "mscale", 1.0), getattr(config, "mscale_all_dim", 0.0)
    if not all(is_finite_number(v) for v in (factor, mscale, all_dim)):
        return  # (validate_rope names the bad number)
    if getattr(config, "rope_type", "yarn") != "yarn":
        # Megatron's MLA multiplies the softmax scale by mscale(factor, mscale_all_dim)^2 under
        # any rope type; ours applies YaRN's factors under rope_type='yarn' only
        if factor > 1 and all_dim:
            raise ValueError(
                f"rope_type={config.rope_type!r} with rotary_scaling_factor={factor!r} and "
                f"mscale_all_dim={all_dim!r}: Megatron's MLA would still scale attention by "
                "mscale(factor, mscale_all_dim)^2, ours (as transformers) not at all without "
                "YaRN. Allowed: rope_type='yarn' (--rope-type yarn), or --rotary-scaling-factor "
                "1.0 or --mscale-all-dim 0 with --rope-type rope")
        return
    # DeepSeek's code and transformers read "not both set" as mscale(factor, 1) alone (and an
    # mscale_all_dim, where set, in the softmax scale), and so do our layers; Megatron's MLA
    # reads mscale(factor, mscale) / mscale(factor, mscale_all_dim) always
    if factor > 1 and ((all_dim == 0 and mscale != 1) or (mscale == 0 and all_dim != 0)):
        raise ValueError(
            f"mscale={mscale!r} with mscale_all_dim={all_dim!r} is ambiguous at "
            f"rotary_scaling_factor={factor!r}: our MLA (as DeepSeek's code and HF transformers) "
            "would scale attention by mscale(factor, 1), Megatron's own MLA by "
            "mscale(factor, mscale) / mscale(factor, mscale_all_dim). Allowed: both > 0 "
            "(DeepSeek-V3: mscale = mscale_all_dim = 1.0, --mscale 1.0 --mscale-all-dim 1.0), "
            "or mscale 1.0 with mscale_all_dim 0")


def validate_rope(config: Any) -> None:
    """RoPE's base, and YaRN's settings when rope_type='yarn' (DeepSeek-V3: factor 40 over an
    original 4096 positions, beta_fast 32 > beta_slow 1, mscale = mscale_all_dim = 1)."""
    # base^(-2i/d) decreases only for base > 1; base = 1 divides by log(base) = 0 in YaRN's ramp
    _number(config, "rotary_base", 1, low_open=True)
    if not isinstance(config, DeepSeekV3Config):
        check_megatron_rope_reading(config)
    if getattr(config, "rope_type", "yarn") != "yarn":
        return
    _number(config, "rotary_scaling_factor", 1)  # 1 = no interpolation (mscale 1)
    if hasattr(config, "original_max_position_embeddings"):
        _positive(config, "original_max_position_embeddings")
    _number(config, "beta_slow", 0, low_open=True)
    beta_fast, beta_slow = getattr(config, "beta_fast", 32), getattr(config, "beta_slow", 1)
    if not is_finite_number(beta_fast) or beta_fast <= beta_slow:
        raise ValueError(f"beta_fast={beta_fast!r} is invalid: allowed values are finite numbers "
                         f"> beta_slow={beta_slow!r} (YaRN's ramp runs from beta_fast rotations, "
                         "the high frequencies kept, down to beta_slow, the low ones interpolated)")
    for field in ("mscale", "mscale_all_dim"):
        _number(config, field, 0)
