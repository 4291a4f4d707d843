"""Megatron-LM flags (megatron-core TransformerConfig / ModelParallelConfig fields) that a
DeepSeek user of Megatron already passes: each is honoured by our modules with Megatron's meaning
or refused at configuration time with a message naming the field, the flag and what to use
instead. `check_upstream_flags(config)` is called by megatron_dsv3.configs.validate_config, which
runs for our DeepSeekV3Config and for the TransformerConfig Megatron-LM builds from its arguments
(our layer validates it when it is built, before training starts).

`RULES` is the list documented in docs/migration.md ("Upstream flags"); tests/test_upstream_flags.py
checks that table against this list and against Megatron-LM's argument parsers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

RECOMPUTE_MODULES = ("core_attn", "layernorm", "mla_up_proj", "moe_act", "mlp", "shared_experts")
"""recompute_modules our layers honour (recompute_granularity='selective')."""


def recompute_modules(config: Any) -> List[str]:
    """`recompute_modules` as Megatron reads it: unset means its default, ['core_attn']."""
    modules = getattr(config, "recompute_modules", None)
    return ["core_attn"] if modules is None else list(modules)


def fp8_on(config: Any) -> bool:
    """Whether an FP8 recipe drives the GEMMs: ours (dsv3_fp8_recipe) or Megatron's (fp8)."""
    return bool(getattr(config, "dsv3_fp8_recipe", None) or getattr(config, "fp8", None))


LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")
"""moe_router_load_balancing_type values our router honours."""


@dataclasses.dataclass(frozen=True)
class Rule:
    flag: str
    field: str
    status: str  # "honoured" or "refused" (refused values are listed in `note`)
    note: str
    dest: Optional[str] = None
    """The flag's argparse dest where it is not `field` (--swiglu: dest swiglu, which Megatron-LM
    turns into gated_linear_unit=True and activation_func=F.silu)."""


RULES: List[Rule] = [
    Rule("--moe-router-dtype", "moe_router_dtype", "honoured",
         "fp64: logits, scores, selection and aux losses in float64; fp32 and unset: float32 "
         "(never below float32)"),
    Rule("--moe-router-load-balancing-type", "moe_router_load_balancing_type", "honoured",
         "aux_loss, seq_aux_loss, none, or a list of them (with a list of "
         "--moe-aux-loss-coeff), with Megatron's formulas, except that with padding "
         "seq_aux_loss counts each sequence's own valid tokens (DeepSeek-V3's formula; Megatron "
         "divides every sequence by the micro-batch's mean count); refused: global_aux_loss with a "
         "coefficient > 0 (use seq_aux_loss or aux_loss), sinkhorn and quantile_balancing (use "
         "--moe-router-enable-expert-bias, DeepSeek-V3's aux-loss-free balancing)"),
    Rule("--moe-aux-loss-coeff", "moe_aux_loss_coeff", "honoured",
         "the coefficient of each load-balancing type (>= 0)"),
    Rule("--moe-z-loss-coeff", "moe_z_loss_coeff", "honoured",
         "coeff * mean over tokens of logsumexp(logits)^2, added to the backward pass"),
    Rule("--moe-input-jitter-eps", "moe_input_jitter_eps", "honoured",
         "router input times U(1-eps, 1+eps) in training (Megatron also jitters in evaluation; "
         "we do not); eps > 0"),
    Rule("--moe-expert-capacity-factor", "moe_expert_capacity_factor", "refused",
         "any value: our MoE is dropless (DeepSeek-V3 drops no tokens); remove it"),
    Rule("--moe-pad-expert-input-to-capacity", "moe_pad_expert_input_to_capacity", "refused",
         "set: no capacity, nothing to pad to; remove it"),
    Rule("--moe-token-drop-policy", "moe_token_drop_policy", "refused",
         "position (probs, the default, is accepted as it has no effect without capacity): "
         "no token dropping; remove it"),
    Rule("--moe-token-dispatcher-type", "moe_token_dispatcher_type", "honoured",
         "allgather and alltoall accepted: the routed result is the same, the communication is "
         "--dsv3-dispatcher's (node-aware by default, flat = one all-to-all); refused: flex "
         "(DeepEP/HybridEP), use --dsv3-dispatcher node-aware [--dsv3-dispatch-fp8]"),
    Rule("--moe-enable-deepep", "moe_enable_deepep", "refused",
         "set: use --dsv3-dispatcher node-aware"),
    Rule("--moe-permute-fusion", "moe_permute_fusion", "refused",
         "set: our dispatchers permute tokens themselves (no TE fused permute); remove it"),
    Rule("--moe-router-padding-for-fp8", "moe_router_padding_for_fp8", "refused",
         "set: our FP8 expert GEMMs take any number of tokens per expert; remove it"),
    Rule("--moe-router-padding-for-quantization", "moe_router_padding_for_quantization",
         "refused", "set: as --moe-router-padding-for-fp8; remove it"),
    Rule("--recompute-granularity", "recompute_granularity", "honoured",
         "selective: the modules of --recompute-modules, by our layers; full: Megatron's "
         "TransformerBlock checkpoints whole layers of ours (its checkpoint saves the CUDA RNG "
         "state, so it needs CUDA; not covered by our tests)"),
    Rule("--recompute-modules", "recompute_modules", "honoured",
         "core_attn (the default), layernorm, mla_up_proj, moe_act, mlp (dense MLP), "
         "shared_experts; refused: moe (use moe_act shared_experts, the routed experts' "
         "activations), gdn_norm_out (no gated delta net here)"),
    Rule("--moe-layer-recompute", "moe_layer_recompute", "refused",
         "set: use --recompute-granularity selective --recompute-modules moe_act shared_experts"),
    Rule("--overlap-moe-expert-parallel-comm", "overlap_moe_expert_parallel_comm", "refused",
         "set: use --pipeline-schedule dualpipev (one micro-batch's expert-parallel "
         "communication overlaps another's computation) and --dsv3-dispatch-chunks"),
    Rule("--delay-wgrad-compute", "delay_wgrad_compute", "refused",
         "set: remove it; DualPipe(V) schedules the backward passes itself"),
    Rule("--context-parallel-size", "context_parallel_size", "refused",
         "> 1: our MLA attends over the local sequence only; use 1 and split with pipeline, "
         "expert and data parallelism"),
    Rule("--normalization", "normalization", "refused",
         "anything but RMSNorm (Megatron-LM's default is LayerNorm): our layers always use "
         "RMSNorm; pass --normalization RMSNorm"),
    Rule("--disable-bias-linear", "add_bias_linear", "refused",
         "absent (Megatron-LM adds biases by default): our linear layers have no biases; pass "
         "--disable-bias-linear"),
    Rule("--swiglu", "gated_linear_unit", "refused",
         "absent (gated_linear_unit=False, or an activation_func other than F.silu, e.g. "
         "--squared-relu, --quick-geglu): our MLPs and experts are always SwiGLU; pass --swiglu",
         dest="swiglu"),
    Rule("--window-size", "window_size", "refused",
         "set: our MLA attends over the whole causal context (DeepSeek-V3 has no sliding "
         "window); remove it"),
    Rule("--softmax-type", "softmax_type", "refused",
         "anything but vanilla (off-by-one, learnable): our attention core is the plain softmax; "
         "remove it"),
    Rule("--apply-residual-connection-post-layernorm", "apply_residual_connection_post_layernorm",
         "refused", "set: our layers add the residual before the norm (pre-norm, DeepSeek-V3); "
                    "remove it"),
    Rule("--rotary-percent", "rotary_percent", "refused",
         "anything but 1.0: MLA applies RoPE to the whole decoupled RoPE part of each head "
         "(DeepSeek-V3); size that part with --qk-pos-emb-head-dim"),
    Rule("--embedding-init-method-std", "embedding_init_method_std", "honoured",
         "the embedding's initial standard deviation (default: --init-method-std's)"),
    Rule("--moe-apply-probs-on-input", "moe_apply_probs_on_input", "refused",
         "set: DeepSeek-V3 weights each routed expert's output by its gate value, not its "
         "input; remove it"),
    Rule("--moe-latent-size", "moe_latent_size", "refused",
         "set: DeepSeek-V3's routed experts read the hidden state itself (no latent "
         "projection around them); remove it"),
    Rule("--position-embedding-type", "position_embedding_type", "refused",
         "learned_absolute (Megatron-LM's default), mrope, relative: MLA applies its own RoPE, "
         "and a learned position table would be a second position encoding DeepSeek-V3 does not "
         "have; pass --position-embedding-type rope (yarn and none are accepted too)"),
    Rule("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights", "refused",
         "absent (Megatron-LM ties the output head to the embedding by default): DeepSeek-V3's "
         "head has its own weights; pass --untie-embeddings-and-output-weights"),
    Rule("--fp4-format", "fp4", "refused",
         "set: no FP4 GEMMs here; use --dsv3-fp8-recipe (DeepSeek-V3's FP8)"),
    Rule("--no-fp8-wgrad", "fp8_wgrad", "refused",
         "set with FP8 on: DeepSeek-V3's recipe runs the weight-gradient GEMMs in FP8 too; "
         "remove it", dest="fp8_wgrad"),
    Rule("--first-last-layers-bf16", "first_last_layers_bf16", "refused",
         "set with FP8 on: our recipe quantises every decoder layer, as DeepSeek-V3 does; "
         "remove it"),
    Rule("--apply-layernorm-1p", "layernorm_zero_centered_gamma", "refused",
         "set: our RMSNorm scales by gamma itself, as DeepSeek-V3 does (not by 1 + gamma); "
         "remove it"),
    Rule("--qk-clip", "qk_clip", "refused",
         "set: our MLA has no QK-clip (Megatron's clip_qk() would skip our layers and clip "
         "nothing); remove it"),
    Rule("--moe-shared-expert-gate", "moe_shared_expert_gate", "refused",
         "set: DeepSeek-V3's shared expert is added ungated; remove it"),
    Rule("--moe-router-force-load-balancing", "moe_router_force_load_balancing", "refused",
         "set: a benchmarking mode our router does not implement (routing would be unchanged); "
         "remove it"),
    Rule("--moe-enable-routing-replay", "moe_enable_routing_replay", "refused",
         "set: our router neither records nor replays routing decisions; remove it"),
]

FP8_ATTENTION_FIELDS = ("fp8_dot_product_attention", "fp8_multi_head_attention",
                        "activation_func_fp8_input_store")
"""TransformerConfig fields (no Megatron-LM flag) that would put attention or activations in
FP8: refused, DeepSeek-V3 keeps the attention core and the activations it stores in high
precision."""


def router_dtype(config: Any) -> torch.dtype:
    """The dtype our router computes in for `moe_router_dtype`."""
    return torch.float64 if getattr(config, "moe_router_dtype", None) == "fp64" else torch.float32


def aux_loss_coefficients(config: Any) -> Dict[str, float]:
    """{load-balancing type: coefficient} as Megatron's router reads them
    (TopKRouter.get_aux_loss_coeff): one type with one coefficient, or a list of types with a
    list of coefficients (a one-element list counts as its element)."""
    kinds = getattr(config, "moe_router_load_balancing_type", "aux_loss")
    coeffs = getattr(config, "moe_aux_loss_coeff", 0.0)
    if isinstance(kinds, (list, tuple)) and len(kinds) == 1:
        kinds = kinds[0]
    if isinstance(coeffs, (list, tuple)) and len(coeffs) == 1:
        coeffs = coeffs[0]
    if isinstance(kinds, str):
        if isinstance(coeffs, (list, tuple)):
            raise ValueError(f"moe_aux_loss_coeff={list(coeffs)} is a list but "
                             f"moe_router_load_balancing_type={kinds!r} is one type: allowed "
                             "values are one coefficient, or a list of types of the same length")
        return {kinds: float(coeffs or 0.0)}
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"moe_router_load_balancing_type={list(kinds)} names a type twice: "
                         "allowed is each type once, with one coefficient in moe_aux_loss_coeff "
                         "(Megatron's router would read the first one's)")
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) != len(kinds):
        raise ValueError(f"moe_aux_loss_coeff={coeffs!r} must be a list of the same length as "
                         f"moe_router_load_balancing_type={list(kinds)} (one coefficient per "
                         "type)")
    return {k: float(c or 0.0) for k, c in zip(kinds, coeffs)}


def is_finite_number(value: Any) -> bool:
    """A real, finite number that is not a bool (a count or a coefficient, never a switch)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _refuse(field: str, value: Any, why: str, flag: Optional[str] = None) -> None:
    flag = flag or next((r.flag for r in RULES if r.field == field),
                        "--" + field.replace("_", "-"))
    raise ValueError(f"{field}={value!r} ({flag}) is not supported by megatron-dsv3: {why}")


def _is_set(config: Any, field: str) -> bool:
    return bool(getattr(config, field, False))


def _refuse_if_set(config: Any, *fields: str) -> None:
    """Refuse the first of `fields` (switches whose rule is "refused" when set) that is set,
    with its rule's note as the reason."""
    for field in fields:
        if _is_set(config, field):
            note = next(r.note for r in RULES if r.field == field)
            _refuse(field, getattr(config, field),
                    f"{note.removeprefix('set: ')} (allowed value: False)")


def check_upstream_flags(config: Any) -> None:
    """Raise ValueError for any Megatron flag (config field) our modules would not honour."""
    cp = getattr(config, "context_parallel_size", 1) or 1
    if cp > 1:
        _refuse("context_parallel_size", cp,
                "our MLA attends over the local sequence only, so context parallelism would "
                "give wrong results; use context_parallel_size=1 and split the model with "
                "pipeline, expert and data parallelism")
    if _is_set(config, "overlap_moe_expert_parallel_comm"):
        _refuse("overlap_moe_expert_parallel_comm", True,
                "Megatron's 1F1B expert-parallel overlap needs its own layer; use "
                "--pipeline-schedule dualpipev (overlaps one micro-batch's dispatch/combine with "
                "another's computation) and --dsv3-dispatch-chunks N")
    if _is_set(config, "delay_wgrad_compute"):
        _refuse("delay_wgrad_compute", True,
                "our layers compute weight gradients in the backward pass; remove the flag "
                "(DualPipe(V) schedules the backward passes itself)")
    _check_layers(config)
    _check_recompute(config)
    _check_fp8_options(config)
    if not getattr(config, "num_moe_experts", None):
        return
    _check_router(config)
    _check_dispatch(config)


def _check_fp8_options(config: Any) -> None:
    """Megatron's FP4 and FP8 variations our FP8 layers would not honour."""
    fp4 = getattr(config, "fp4", None)
    if fp4:
        _refuse("fp4", fp4, "no FP4 GEMMs here; use dsv3_fp8_recipe (--dsv3-fp8-recipe, "
                            "DeepSeek-V3's FP8) (allowed value: None)")
    for field in FP8_ATTENTION_FIELDS:
        if _is_set(config, field):
            _refuse(field, True, "DeepSeek-V3 keeps the attention core and stored activations in "
                                 "high precision (allowed value: False)", flag="a config field")
    if not fp8_on(config):
        return  # (without FP8 Megatron ignores the two below as well)
    if getattr(config, "fp8_wgrad", True) is False:
        _refuse("fp8_wgrad", False, "DeepSeek-V3's recipe runs the weight-gradient GEMMs in FP8 "
                                    "too; remove it (allowed value: True)")
    if _is_set(config, "first_last_layers_bf16"):
        _refuse("first_last_layers_bf16", True, "our FP8 recipe quantises every decoder layer, "
                                                "as DeepSeek-V3 does; remove it (allowed value: "
                                                "False)")


def _check_layers(config: Any) -> None:
    """DeepSeek-V3's layer choices, which our modules build whatever the config says: RMSNorm,
    no biases, SwiGLU (Megatron-LM's defaults are LayerNorm, biases and GeLU). qk_layernorm is
    not checked: our MLA always applies its latent RMSNorms (docs/migration.md)."""
    norm = getattr(config, "normalization", "RMSNorm")
    if norm != "RMSNorm":
        _refuse("normalization", norm, "our layers always use RMSNorm (DeepSeek-V3); allowed "
                                       "value: 'RMSNorm' (pass --normalization RMSNorm)")
    if getattr(config, "add_bias_linear", False):
        _refuse("add_bias_linear", config.add_bias_linear,
                "our linear layers have no biases (DeepSeek-V3); allowed value: False (pass "
                "--disable-bias-linear)")
    if not getattr(config, "gated_linear_unit", True):
        _refuse("gated_linear_unit", config.gated_linear_unit,
                "our MLPs and experts are always SwiGLU (DeepSeek-V3); allowed value: True with "
                "activation_func=torch.nn.functional.silu (pass --swiglu)")
    _refuse_if_set(config, "layernorm_zero_centered_gamma", "qk_clip")
    if getattr(config, "window_size", None) is not None:
        _refuse("window_size", config.window_size,
                "our MLA attends over the whole causal context (DeepSeek-V3 has no sliding "
                "window); allowed value: None (remove --window-size)")
    softmax = getattr(config, "softmax_type", "vanilla")
    if softmax != "vanilla":
        _refuse("softmax_type", softmax, "our attention core is the plain softmax; allowed "
                                         "value: 'vanilla' (remove --softmax-type)")
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        _refuse("apply_residual_connection_post_layernorm", True,
                "our layers add the residual before the norm (pre-norm, DeepSeek-V3); allowed "
                "value: False (remove the flag)")
    rotary_percent = getattr(config, "rotary_percent", 1.0)
    if rotary_percent != 1.0:
        _refuse("rotary_percent", rotary_percent,
                "MLA applies RoPE to the whole decoupled RoPE part of each head (DeepSeek-V3); "
                "allowed value: 1.0 (size that part with --qk-pos-emb-head-dim)")
    if _is_set(config, "moe_apply_probs_on_input"):
        _refuse("moe_apply_probs_on_input", True,
                "DeepSeek-V3 weights each routed expert's output by its gate value, not its "
                "input; allowed value: False (remove the flag)")
    if getattr(config, "moe_latent_size", None) is not None:
        _refuse("moe_latent_size", config.moe_latent_size,
                "DeepSeek-V3's routed experts read the hidden state itself (no latent "
                "projection around them); allowed value: None (remove the flag)")
    act = getattr(config, "activation_func", F.silu)
    if act is not F.silu:
        _refuse("activation_func", getattr(act, "__name__", repr(act)),
                "our MLPs and experts are always SwiGLU (DeepSeek-V3); allowed value: "
                "torch.nn.functional.silu with gated_linear_unit=True (pass --swiglu; not "
                "--squared-relu or --quick-geglu)", flag="--swiglu")


POSITION_EMBEDDING_TYPES = ("rope", "yarn", "none")
"""--position-embedding-type values that add nothing to the embedding (GPTModel's rotary table for
rope / yarn is handed to our layers, which apply MLA's own RoPE and do not read it)."""


def check_megatron_lm_args(args: Any) -> None:
    """Megatron-LM's arguments that its GPTModel applies around our layers (embedding and head),
    so they are not config fields: the ones DeepSeek-V3 cannot have are refused, on both routes
    (our model ignores them; GPTModel would build them)."""
    kind = getattr(args, "position_embedding_type", "rope")
    if kind not in POSITION_EMBEDDING_TYPES:
        _refuse("position_embedding_type", kind,
                "MLA applies its own RoPE, and Megatron's GPTModel would add a second position "
                "encoding DeepSeek-V3 does not have; allowed values: "
                f"{', '.join(repr(k) for k in POSITION_EMBEDDING_TYPES)} (pass "
                "--position-embedding-type rope)")
    if not getattr(args, "untie_embeddings_and_output_weights", True):
        _refuse("untie_embeddings_and_output_weights", False,
                "DeepSeek-V3's output head has its own weights, and Megatron's GPTModel ties it "
                "to the embedding without the flag; allowed value: True (pass "
                "--untie-embeddings-and-output-weights)")


def megatron_lm_args() -> Optional[Any]:
    """Megatron-LM's parsed arguments when this process runs its training code (None
    otherwise; megatron.training is never imported here)."""
    import sys

    global_vars = sys.modules.get("megatron.training.global_vars")
    return getattr(global_vars, "_GLOBAL_ARGS", None) if global_vars is not None else None


def check_spec_route_args() -> None:
    """check_megatron_lm_args for a model Megatron-LM builds from `--spec megatron_dsv3...`
    (its GPTModel around our layers); called when our layers are built."""
    args = megatron_lm_args()
    spec = getattr(args, "spec", None) or ()
    if spec and str(spec[0]).startswith("megatron_dsv3"):
        check_megatron_lm_args(args)


def _check_recompute(config: Any) -> None:
    if _is_set(config, "moe_layer_recompute"):
        _refuse("moe_layer_recompute", True,
                "recomputing the whole MoE layer would repeat its expert-parallel communication "
                "and routing statistics; use recompute_granularity='selective' with "
                "recompute_modules=['moe_act', 'shared_experts']")
    granularity = getattr(config, "recompute_granularity", None)
    if granularity != "selective":
        return
    modules = recompute_modules(config)
    for name in modules:
        if name == "moe":
            _refuse("recompute_modules", modules,
                    "'moe' (the whole MoE layer) would repeat its expert-parallel communication "
                    "and routing statistics; use 'moe_act' and 'shared_experts' (allowed: "
                    f"{', '.join(RECOMPUTE_MODULES)})")
        if name not in RECOMPUTE_MODULES:
            _refuse("recompute_modules", modules,
                    f"{name!r} is not a module of ours; allowed values: "
                    f"{', '.join(RECOMPUTE_MODULES)}")


def _check_router(config: Any) -> None:
    _refuse_if_set(config, "moe_shared_expert_gate", "moe_router_force_load_balancing",
                   "moe_enable_routing_replay")
    dtype = getattr(config, "moe_router_dtype", None)
    if dtype not in (None, "fp32", "fp64"):
        _refuse("moe_router_dtype", dtype, "allowed values are None, 'fp32', 'fp64'")
    coeffs = getattr(config, "moe_aux_loss_coeff", 0.0)
    for coeff in coeffs if isinstance(coeffs, (list, tuple)) else [coeffs]:
        if coeff is not None and not (is_finite_number(coeff) and coeff >= 0):
            raise ValueError(f"moe_aux_loss_coeff={coeffs!r} is invalid: allowed values are "
                             "finite numbers >= 0 (a list: one per load-balancing type)")
    for kind, coeff in aux_loss_coefficients(config).items():
        if kind == "global_aux_loss" and coeff > 0:
            _refuse("moe_router_load_balancing_type", kind,
                    "the global-batch loss is not implemented; use 'seq_aux_loss' (DeepSeek-V3) "
                    "or 'aux_loss' (micro-batch), or 'none' with "
                    "moe_router_enable_expert_bias=True")
        elif kind in ("sinkhorn", "quantile_balancing"):
            _refuse("moe_router_load_balancing_type", kind,
                    "our router is DeepSeek-V3's sigmoid gate; for balancing use "
                    "moe_router_enable_expert_bias=True (aux-loss-free) with 'seq_aux_loss', "
                    "'aux_loss' or 'none'")
        elif kind not in LOAD_BALANCING_TYPES + ("global_aux_loss",):
            _refuse("moe_router_load_balancing_type", kind,
                    f"allowed values: {', '.join(LOAD_BALANCING_TYPES)}")
    z = getattr(config, "moe_z_loss_coeff", None)
    if z is not None and not (is_finite_number(z) and z >= 0):
        raise ValueError(f"moe_z_loss_coeff={z!r} is invalid: allowed values are None or finite "
                         "numbers >= 0")
    eps = getattr(config, "moe_input_jitter_eps", None)
    if eps is not None and not (is_finite_number(eps) and eps > 0):
        raise ValueError(f"moe_input_jitter_eps={eps!r} is invalid: allowed values are None or "
                         "finite numbers > 0 (noise drawn from U(1 - eps, 1 + eps))")


def _check_dispatch(config: Any) -> None:
    capacity = getattr(config, "moe_expert_capacity_factor", None)
    if capacity is not None:
        _refuse("moe_expert_capacity_factor", capacity,
                "our MoE is dropless (DeepSeek-V3 drops no tokens in training); remove it "
                "(allowed value: None)")
    if _is_set(config, "moe_pad_expert_input_to_capacity"):
        _refuse("moe_pad_expert_input_to_capacity", True,
                "there is no capacity to pad to (dropless MoE); remove it")
    policy = getattr(config, "moe_token_drop_policy", "probs")
    if policy not in (None, "probs"):
        _refuse("moe_token_drop_policy", policy,
                "no tokens are dropped (dropless MoE); remove it (allowed value: 'probs', the "
                "default, which has no effect)")
    dispatcher = getattr(config, "moe_token_dispatcher_type", "allgather")
    if dispatcher not in ("allgather", "alltoall"):
        _refuse("moe_token_dispatcher_type", dispatcher,
                "DeepEP/HybridEP are not used; use dsv3_dispatcher='node-aware' "
                "(--dsv3-dispatcher node-aware, each token crosses nodes once per destination "
                "node; --dsv3-dispatch-fp8 for an FP8 payload); 'allgather' and 'alltoall' are "
                "accepted (the communication is dsv3_dispatcher's)")
    if _is_set(config, "moe_enable_deepep"):
        _refuse("moe_enable_deepep", True, "DeepEP is not used; use dsv3_dispatcher='node-aware'")
    if _is_set(config, "moe_permute_fusion"):
        _refuse("moe_permute_fusion", True,
                "our dispatchers permute tokens themselves (no Transformer Engine fused "
                "permute); remove it")
    for field in ("moe_router_padding_for_fp8", "moe_router_padding_for_quantization"):
        if _is_set(config, field):
            _refuse(field, True, "our FP8 expert GEMMs take any number of tokens per expert "
                                 "(no routing-map padding needed); remove it")
