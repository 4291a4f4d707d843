"""Megatron-LM flags a DeepSeek user already passes: each is honoured by our modules or refused at
configuration time (megatron_dsv3.upstream_flags). Checks:
- docs/migration.md's table lists exactly upstream_flags.RULES, and every flag in it is a flag of
  Megatron-LM's argument parser: the installed one (megatron-core >= 0.19 wheels ship
  megatron/training; run under a 0.19 environment) and the checkout in MEGATRON_LM_PATH
  (e.g. core_v0.16.1); each is skipped where not available;
- each refusal fires when the config is built, naming the field, the flag and the alternative;
- the honoured recompute modules really recompute (the module runs again in backward) with
  identical gradients and fewer saved activations. The router options are tested against
  closed-form references in tests/moe/test_router_upstream_options.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_dsv3 import upstream_flags
from megatron_dsv3.configs import get_config, validate_config
from megatron_dsv3.model import build_model
from megatron_dsv3.testing.pipeline_checks import grads_by_global_name

@pytest.fixture(autouse=True)
def _restore_aux_loss_scale():
    """Backward through MoEAuxLossAutoScaler sets its class-wide scale (a 0-d tensor) when unset;
    leave it as found so later tests (Megatron's schedules set a [1] scale) are unaffected."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
    scalers = (MoEAuxLossAutoScaler, MTPLossAutoScaler)
    saved = [c.main_loss_backward_scale for c in scalers]
    yield
    for c, scale in zip(scalers, saved):
        c.main_loss_backward_scale = scale


ROOT = Path(__file__).resolve().parents[1]

# Every flag issue 15 (item 4) names: each must have a row.
NAMED_IN_ISSUE = [
    "--moe-router-dtype", "--moe-router-load-balancing-type", "--moe-z-loss-coeff",
    "--moe-input-jitter-eps", "--moe-expert-capacity-factor", "--moe-pad-expert-input-to-capacity",
    "--moe-token-drop-policy", "--moe-token-dispatcher-type", "--moe-permute-fusion",
    "--moe-router-padding-for-fp8", "--recompute-granularity", "--recompute-modules",
    "--overlap-moe-expert-parallel-comm", "--delay-wgrad-compute", "--context-parallel-size",
]


def doc_table():
    """{flag: status} from the 'Upstream Megatron flags' section of docs/migration.md."""
    text = (ROOT / "docs" / "migration.md").read_text()
    section = text.split(". Upstream Megatron flags\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(--[a-z0-9-]+)`\s*\|\s*(\w+)\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_doc_table_is_the_rule_list_and_covers_the_issue():
    rows = doc_table()
    assert rows == {r.flag: r.status for r in upstream_flags.RULES}
    assert set(NAMED_IN_ISSUE) <= set(rows)
    assert set(rows.values()) <= {"honoured", "refused"}


# Megatron-LM 0.19's training package imports typing.override (Python 3.12); on 3.11 borrow it
# from typing_extensions so its parser and builder can be read.
_PY311_SHIM = r"""
import typing, warnings
warnings.simplefilter("ignore")
try:
    import typing_extensions
    typing.override = getattr(typing, "override", typing_extensions.override)
except ImportError:
    pass
"""

_PARSER_FLAGS = _PY311_SHIM + r"""
import argparse, json
from megatron.training import arguments
parser = argparse.ArgumentParser(allow_abbrev=False)
arguments.add_megatron_arguments(parser)
acts = parser._option_string_actions
print(json.dumps({k: [a.dest, [str(c) for c in a.choices] if a.choices else None]
                  for k, a in acts.items()}))
"""


def _parser_flags(pythonpath=None):
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _PARSER_FLAGS], env=env, capture_output=True,
                         text=True, timeout=300, cwd=pythonpath or None)
    if out.returncode:
        return None, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def _check_against(flags):
    for rule in upstream_flags.RULES:
        assert rule.flag in flags, f"{rule.flag} is not a flag of this Megatron-LM"
        dest = rule.dest or rule.field  # (--swiglu: dest swiglu, setting gated_linear_unit)
        assert flags[rule.flag][0] == dest, (rule.flag, flags[rule.flag][0], dest)
    # the choices we decided on are the parser's choices (a new choice needs a decision)
    lb = set(flags["--moe-router-load-balancing-type"][1])
    assert lb <= {"aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn",
                  "quantile_balancing", "none"}, lb
    assert set(flags["--moe-token-dispatcher-type"][1]) == {"allgather", "alltoall", "flex"}
    assert set(flags["--moe-router-dtype"][1]) == {"fp32", "fp64"}
    assert set(flags["--recompute-granularity"][1]) == {"full", "selective"}


def test_rules_against_installed_megatron_training_parser():
    """megatron-core 0.19 wheels include megatron/training (run this under /tmp/v019 or CI's
    0.19 environment); 0.16.1's wheel does not."""
    import importlib.util
    if importlib.util.find_spec("megatron.training") is None:
        pytest.skip("megatron.training is not installed (megatron-core < 0.19 wheel)")
    flags, err = _parser_flags()
    assert flags is not None, err
    _check_against(flags)


def test_rules_against_megatron_lm_checkout_parser():
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        pytest.skip("MEGATRON_LM_PATH not set (a Megatron-LM checkout, e.g. core_v0.16.1)")
    flags, err = _parser_flags(path)
    assert flags is not None, err
    _check_against(flags)


# ---- refusals at configuration time ------------------------------------------------------------
REFUSED = [
    (dict(context_parallel_size=2), "context_parallel_size", "context_parallel_size=1"),
    (dict(overlap_moe_expert_parallel_comm=True), "overlap_moe_expert_parallel_comm",
     "dualpipev"),
    (dict(delay_wgrad_compute=True), "delay_wgrad_compute", "remove the flag"),
    (dict(moe_expert_capacity_factor=1.25), "moe_expert_capacity_factor", "dropless"),
    (dict(moe_pad_expert_input_to_capacity=True), "moe_pad_expert_input_to_capacity", "remove"),
    (dict(moe_token_drop_policy="position"), "moe_token_drop_policy", "remove"),
    (dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type", "node-aware"),
    (dict(moe_permute_fusion=True), "moe_permute_fusion", "remove"),
    (dict(moe_router_padding_for_fp8=True), "moe_router_padding_for_fp8", "remove"),
    (dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-3),
     "moe_router_load_balancing_type", "seq_aux_loss"),
    (dict(moe_router_load_balancing_type="sinkhorn", moe_aux_loss_coeff=0.0),
     "moe_router_load_balancing_type", "moe_router_enable_expert_bias"),
    (dict(recompute_granularity="selective", recompute_modules=["moe"]), "recompute_modules",
     "moe_act"),
    (dict(recompute_granularity="selective", recompute_modules=["gdn_norm_out"]),
     "recompute_modules", "allowed values"),
    (dict(window_size=(4, 0)), "window_size", "remove --window-size"),
    (dict(softmax_type="off-by-one"), "softmax_type", "'vanilla'"),
    (dict(apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm", "pre-norm"),
    (dict(rotary_percent=0.5), "rotary_percent", "--qk-pos-emb-head-dim"),
    (dict(moe_latent_size=16), "moe_latent_size", "remove the flag"),
    (dict(moe_input_jitter_eps=0.0), "moe_input_jitter_eps", "> 0"),
    (dict(moe_z_loss_coeff=-1.0), "moe_z_loss_coeff", ">= 0"),
    (dict(fp4="nvfp4"), "fp4", "--dsv3-fp8-recipe"),
    (dict(dsv3_fp8_recipe="deepseek", fp8_wgrad=False), "fp8_wgrad", "in FP8 too"),
    (dict(dsv3_fp8_recipe="deepseek", first_last_layers_bf16=True,
          num_layers_at_start_in_bf16=1), "first_last_layers_bf16", "every decoder layer"),
    (dict(fp8_dot_product_attention=True), "fp8_dot_product_attention", "high precision"),
    (dict(fp8_multi_head_attention=True), "fp8_multi_head_attention", "high precision"),
    (dict(activation_func_fp8_input_store=True), "activation_func_fp8_input_store",
     "high precision"),
    # accepted before and silently without effect (found by a review)
    (dict(layernorm_zero_centered_gamma=True), "layernorm_zero_centered_gamma", "1 + gamma"),
    (dict(qk_clip=True), "qk_clip", "clip nothing"),
    (dict(moe_shared_expert_gate=True), "moe_shared_expert_gate", "ungated"),
    (dict(moe_router_force_load_balancing=True), "moe_router_force_load_balancing",
     "routing would be unchanged"),
    (dict(moe_enable_routing_replay=True), "moe_enable_routing_replay", "replays"),
]


@pytest.mark.parametrize("overrides,field,alternative", REFUSED,
                         ids=[r[1] + "-" + str(i) for i, r in enumerate(REFUSED)])
def test_refused_when_the_config_is_built(overrides, field, alternative):
    with pytest.raises(ValueError) as err:
        get_config("deepseek-v3-tiny", **overrides)
    message = str(err.value)
    assert message.startswith(field) or f" {field}" in message, message
    assert alternative in message, message
    if field not in ("moe_input_jitter_eps", "moe_z_loss_coeff",  # invalid values, not refusals
                     *upstream_flags.FP8_ATTENTION_FIELDS):  # (no Megatron-LM flag)
        rule = next(r for r in upstream_flags.RULES if r.field == field)
        assert rule.flag in message, message


def test_fp8_variations_are_accepted_without_fp8_and_the_payload_switch_is_a_bool():
    """Megatron ignores --no-fp8-wgrad and --first-last-layers-bf16 without FP8; so do we."""
    get_config("deepseek-v3-tiny", fp8_wgrad=False, first_last_layers_bf16=True)
    with pytest.raises(ValueError, match=r"dsv3_dispatch_fp8='yes' is invalid: allowed values "
                                         r"are True, False"):
        get_config("deepseek-v3-tiny", dsv3_dispatch_fp8="yes")


def _megatron_lm_config(**kw):
    """The MLA config Megatron-LM builds from a DeepSeek job's flags (--disable-bias-linear
    --swiglu set the last three), with `kw` on top."""
    return MLATransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                moe_router_score_function="sigmoid",
                                moe_token_dispatcher_type="alltoall", q_lora_rank=32,
                                kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                                v_head_dim=16, add_bias_linear=False, gated_linear_unit=True,
                                activation_func=torch.nn.functional.silu, **kw)


def test_refused_on_megatron_lm_config_too():
    """The TransformerConfig Megatron-LM builds from its arguments (not ours) goes through the
    same check: our transformer layer validates its config when it is built."""
    cfg = _megatron_lm_config()  # as Megatron-LM's
    validate_config(cfg)  # --disable-bias-linear --swiglu set them
    # (set after construction: without Transformer Engine Megatron's own __post_init__ already
    # fails on moe_permute_fusion; with TE it accepts it and only our check stops it)
    cfg.moe_permute_fusion = True
    with pytest.raises(ValueError, match="moe_permute_fusion.*--moe-permute-fusion"):
        validate_config(cfg)
    cfg.moe_permute_fusion = False
    cfg.context_parallel_size = 2
    with pytest.raises(ValueError, match="context_parallel_size=2.*--context-parallel-size"):
        validate_config(cfg)


def test_refused_after_megatrons_own_checks():
    """Fields Megatron's own config check ties to other settings (moe_apply_probs_on_input needs
    top-1 there): set after construction, our check still refuses them by flag."""
    cfg = get_config("deepseek-v3-tiny")
    cfg.moe_apply_probs_on_input = True
    with pytest.raises(ValueError, match=r"moe_apply_probs_on_input=True "
                                         r"\(--moe-apply-probs-on-input\).*gate value"):
        validate_config(cfg)


def test_plain_transformer_config_is_refused_naming_multi_latent_attention():
    """Megatron-LM without --multi-latent-attention builds a TransformerConfig without MLA's
    fields: the error says so, not 'kv_lora_rank=None is invalid'."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"multi_latent_attention=False.*pass "
                                         r"--multi-latent-attention"):
        validate_config(cfg)


class _Args:  # Megatron-LM's parsed arguments, as far as these checks read them
    def __init__(self, **kw):
        self.spec = ["megatron_dsv3.layer_specs", "layer_spec"]
        self.position_embedding_type = "rope"
        self.untie_embeddings_and_output_weights = True
        self.transformer_impl = "local"
        self.__dict__.update(kw)


@pytest.fixture
def megatron_lm_args(monkeypatch):
    """Install fake Megatron-LM global arguments (megatron.training.global_vars._GLOBAL_ARGS),
    as Megatron-LM's training code holds them once it has parsed its command line."""
    import sys
    import types

    module = types.ModuleType("megatron.training.global_vars")
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", module)

    def install(**kw):
        module._GLOBAL_ARGS = _Args(**kw)
        return module._GLOBAL_ARGS
    return install


@pytest.mark.parametrize("kw,message", [
    (dict(position_embedding_type="learned_absolute"),
     r"position_embedding_type='learned_absolute' \(--position-embedding-type\).*allowed values: "
     r"'rope', 'yarn', 'none'"),
    (dict(untie_embeddings_and_output_weights=False),
     r"untie_embeddings_and_output_weights=False \(--untie-embeddings-and-output-weights\).*"
     r"pass --untie-embeddings-and-output-weights"),
])
def test_spec_route_refuses_what_gptmodel_would_build_around_our_layers(
        megatron_lm_args, kw, message, single_rank_world):
    """Route a (pretrain_gpt.py --spec megatron_dsv3...): Megatron's GPTModel builds the embedding
    and head from its own arguments; a learned position table or a tied head is refused when our
    layers are built. Without --spec naming us (route b builds its own model) nothing is
    checked."""
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron.core.transformer.spec_utils import build_module

    config = get_config("deepseek-v3-tiny")
    megatron_lm_args(**kw)
    with pytest.raises(ValueError, match=message):
        build_module(get_layer_spec(config), config=config, layer_number=1)
    megatron_lm_args(spec=None, **kw)
    upstream_flags.check_spec_route_args()  # (route b: our model, nothing around it)
    megatron_lm_args()
    build_module(get_layer_spec(config), config=config, layer_number=1)


def test_spec_route_takes_transformer_impl_from_megatron_lm_args(megatron_lm_args):
    """`layer_spec` is resolved when --spec imports the module, after Megatron-LM parsed its
    arguments: --transformer-impl local gives our portable modules even where TE would be
    picked automatically."""
    from megatron_dsv3 import layer_specs

    megatron_lm_args(transformer_impl="local")
    assert layer_specs._megatron_lm_impl() is False
    megatron_lm_args(transformer_impl="transformer_engine")
    assert layer_specs._megatron_lm_impl() is None  # (the automatic choice: TE where it runs)


def test_spec_route_layer_spec_is_built_with_the_parsed_transformer_impl(megatron_lm_args,
                                                                          monkeypatch):
    """The module attribute `--spec` reads: imported after Megatron-LM parsed
    `--transformer-impl local`, on a machine where TE would be picked automatically, its
    modules are ours (which classes TE's would be is not imported: TE is not installed here)."""
    import importlib
    import sys

    from megatron_dsv3 import compat
    from megatron_dsv3.core.linear import ColumnParallelLinear

    import megatron_dsv3

    chosen = []
    monkeypatch.setattr(compat, "use_transformer_engine", lambda: chosen.append(1) or True)
    megatron_lm_args(transformer_impl="local")
    # a fresh import, as `--spec` does it; the module the package holds is put back afterwards
    monkeypatch.setattr(megatron_dsv3, "layer_specs", sys.modules["megatron_dsv3.layer_specs"])
    monkeypatch.delitem(sys.modules, "megatron_dsv3.layer_specs")
    fresh = importlib.import_module("megatron_dsv3.layer_specs")
    attention = fresh.layer_spec.submodules.self_attention.submodules
    assert attention.linear_q_up_proj.module is ColumnParallelLinear and not chosen


def test_embedding_init_method_std_is_honoured(single_rank_world):
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny", embedding_init_method_std=0.5,
                                   init_method_std=0.02))
    embedding = model.embedding.word_embeddings.weight.float().std().item()
    head = model.output_layer.weight.float().std().item()
    assert abs(embedding - 0.5) < 0.02 and abs(head - 0.02) < 0.002, (embedding, head)
    for bad in (float("inf"), float("nan"), -0.1):
        with pytest.raises(ValueError, match=r"embedding_init_method_std=.* is invalid: allowed "
                                             r"values are finite numbers >= 0 or None"):
            get_config("deepseek-v3-tiny", embedding_init_method_std=bad)


def test_accepted_values():
    for overrides in (dict(moe_token_dispatcher_type="alltoall"),
                      dict(moe_token_dispatcher_type="allgather"),
                      dict(moe_router_dtype="fp64"), dict(moe_router_dtype=None),
                      dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=1e-3),
                      dict(moe_router_load_balancing_type="global_aux_loss",
                           moe_aux_loss_coeff=0.0),
                      dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                           moe_aux_loss_coeff=[1e-3, 1e-4]),
                      dict(moe_z_loss_coeff=1e-3, moe_input_jitter_eps=1e-2),
                      dict(recompute_granularity="selective",
                           recompute_modules=list(upstream_flags.RECOMPUTE_MODULES))):
        get_config("deepseek-v3-tiny", **overrides)


# ---- recompute modules: run again in backward, identical gradients, fewer saved tensors ---------
def _run(config, count_suffix):
    torch.manual_seed(0)
    model = build_model(config)
    calls = []
    for name, module in model.named_modules():
        if name.endswith(count_suffix):
            def counted(*args, _forward=module.forward, **kwargs):
                calls.append(1)
                return _forward(*args, **kwargs)
            module.forward = counted
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).expand(2, 24)
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, pos, None, labels=ids).mean()
    forward_calls = len(calls)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, forward_calls, len(calls) - forward_calls, sum(saved.values())


@pytest.mark.parametrize("module,suffix,modules", [
    ("core_attn", "core_attention", None),  # None: Megatron's default ['core_attn']
    ("mlp", "layers.0.mlp", ["mlp"]),
    ("shared_experts", "shared_experts", ["shared_experts"]),
])
def test_selective_recompute_module_runs_again_with_identical_gradients(
        single_rank_world, module, suffix, modules):
    base_loss, base, fwd, bwd, base_saved = _run(get_config("deepseek-v3-tiny"), suffix)
    assert fwd > 0 and bwd == 0
    cfg = get_config("deepseek-v3-tiny", recompute_granularity="selective",
                     recompute_modules=modules)
    loss, grads, fwd2, bwd2, saved = _run(cfg, suffix)
    assert fwd2 == fwd and bwd2 == fwd  # every instance ran once more, in backward
    assert torch.equal(loss, base_loss)
    assert grads.keys() == base.keys()
    for name in base:
        assert torch.equal(grads[name], base[name]), name
    assert saved < base_saved, (module, saved, base_saved)


def test_recompute_modules_combine_with_output_discarding(single_rank_world):
    mods = list(upstream_flags.RECOMPUTE_MODULES)
    base_loss, base, _, _, base_saved = _run(get_config("deepseek-v3-tiny"), "core_attention")
    cfg = get_config("deepseek-v3-tiny", recompute_granularity="selective", recompute_modules=mods)
    loss, grads, _, bwd, saved = _run(cfg, "core_attention")
    assert bwd > 0 and torch.equal(loss, base_loss) and saved < base_saved
    for name in base:
        assert torch.equal(grads[name], base[name]), name


_MLM_BUILD = _PY311_SHIM + r"""
import json, os, sys
import megatron_dsv3  # noqa: F401
import megatron.core  # the installed megatron-core, not the checkout's copy
MLM, TESTS = sys.argv[1], sys.argv[2]
sys.path.insert(0, MLM)
sys.path.insert(0, os.path.join(TESTS, "integration"))
from tiny_args_check import TINY, parse_megatron_args
args = parse_megatron_args(["--spec", "megatron_dsv3.layer_specs", "layer_spec"] + TINY + [
    "--moe-z-loss-coeff", "1e-3", "--moe-router-dtype", "fp64", "--moe-input-jitter-eps", "0.01",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-4"])
from gpt_builders import gpt_builder
router = gpt_builder(args, True, True).decoder.layers[1].mlp.router
result = {"z": router.z_loss_coeff, "dtype": str(router.dtype), "jitter": router.jitter_eps,
          "aux": router.aux_loss_coeffs}
# as --moe-router-load-balancing-type global_aux_loss --moe-aux-loss-coeff 1e-3 would set them
args.moe_router_load_balancing_type, args.moe_aux_loss_coeff = "global_aux_loss", 1e-3
try:
    gpt_builder(args, True, True)
except ValueError as e:
    result["refused"] = str(e)
print(json.dumps(result))
"""


def test_megatron_lm_pretrain_path_honours_and_refuses():
    """Megatron-LM's own argument parsing and GPT builder (what pretrain_gpt.py --spec does):
    honoured flags reach the router; a refused one stops the model build, before any training
    step."""
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        pytest.skip("MEGATRON_LM_PATH not set (a Megatron-LM checkout, e.g. core_v0.16.1)")
    out = subprocess.run([sys.executable, "-c", _MLM_BUILD, path, str(ROOT / "tests")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    refused = got.pop("refused", "")
    assert got == {"z": 1e-3, "dtype": "torch.float64", "jitter": 0.01,
                   "aux": {"seq_aux_loss": 1e-4}}, got
    assert "moe_router_load_balancing_type" in refused and "seq_aux_loss" in refused, refused


# ---- recompute under DualPipeV (deferred weight gradients, two chunks per rank) ---------------
_ALL = ["core_attn", "layernorm", "mla_up_proj", "moe_act", "mlp", "shared_experts"]
_B, _S, _N = 2, 16, 4


def _pp_config(recompute):
    kw = dict(recompute_granularity="selective", recompute_modules=_ALL) if recompute else {}
    return get_config("deepseek-v3-tiny", num_layers=4, first_k_dense_replace=1, mtp_num_layers=1,
                      **kw)


def _pp_batches():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(_N):
        ids = torch.randint(1, 255, (_B, _S + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _pp_forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    out = model(tokens, torch.arange(_S).expand(_B, _S), None, labels=labels)

    def loss_func(per_token):
        total = per_token.float().sum()
        return total, torch.tensor(per_token.numel(), dtype=torch.int), {"lm loss": total.detach()}
    return out, loss_func


def _pp_dualpipev(rank, world):
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import get_forward_backward_func

    chunks = build_model_chunks(_pp_config(True), "dualpipev", rank, world)
    batches = _pp_batches()
    get_forward_backward_func("dualpipev")(
        forward_step_func=_pp_forward_step, data_iterator=[iter(batches), iter(batches)],
        model=chunks, num_microbatches=_N, seq_length=_S, micro_batch_size=_B, forward_only=False)
    return grads_by_global_name(chunks)


def test_recompute_under_dualpipev_gives_the_unpipelined_gradients(single_rank_world):
    """Every honoured recompute module at once, under DualPipeV on 2 ranks with MTP (weight
    gradients deferred to the schedule's W passes): the gradients of the plain model without
    recomputation (float32 reassociation only)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from megatron_dsv3.testing.distributed import run_distributed

    model = build_model(_pp_config(False))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / _N))
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0 / _N))
    for tokens, labels in _pp_batches():
        per_token = model(tokens, torch.arange(_S).expand(_B, _S), None, labels=labels)
        (per_token.float().sum() / per_token.numel() / _N).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    results = run_distributed(_pp_dualpipev, 2,
                              megatron_parallel={"pipeline_model_parallel_size": 2})
    seen = set()
    for grads in results:
        for name, g in grads.items():
            rel = ((g - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)).item()
            assert rel < 1e-5, (name, rel)
            seen.add(name)
    assert seen == set(ref)


def test_spec_route_initial_weights_follow_megatron_lm_seed(megatron_lm_args, single_rank_world):
    """Route a: Megatron-LM's config has no init_seed; our layers' initial weights must follow
    its --seed as Megatron's own layers do (they were drawn with a fixed seed whatever --seed
    said, so runs meant to differ started from the same decoder)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsv3.layer_specs import get_layer_spec

    cfg = _megatron_lm_config()

    def first_layer(seed):
        megatron_lm_args(seed=seed)
        layer = build_module(get_layer_spec(cfg), config=cfg, layer_number=1)
        return torch.cat([p.detach().flatten() for p in layer.parameters()])

    one, two = first_layer(1), first_layer(2)
    assert not torch.equal(one, two) and torch.equal(one, first_layer(1))


def test_megatron_lm_mscale_flags_read_differently_by_transformers_are_refused():
    """YaRN's attention factor: DeepSeek's code, transformers and our MLA read "mscale and
    mscale_all_dim not both set" as mscale(factor, 1) alone; Megatron's MLA reads
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) always. A Megatron-LM config whose
    --mscale / --mscale-all-dim the two read differently was silently given our reading."""
    from megatron_dsv3.attention.rope import get_mscale

    def config(**kw):
        return _megatron_lm_config(rotary_scaling_factor=40.0, **kw)

    for mscale, all_dim in ((0.707, 0.0), (0.0, 1.0), (0.0, 0.0)):
        # the two readings really differ here
        ours = get_mscale(40.0, mscale) / get_mscale(40.0, all_dim) if mscale and all_dim \
            else get_mscale(40.0)
        assert ours != pytest.approx(get_mscale(40.0, mscale) / get_mscale(40.0, all_dim))
        with pytest.raises(ValueError, match=f"mscale={mscale} with mscale_all_dim={all_dim} is "
                                             "ambiguous.*Allowed: both > 0"):
            validate_config(config(mscale=mscale, mscale_all_dim=all_dim))
    for mscale, all_dim in ((1.0, 0.0), (1.0, 1.0), (0.707, 0.707)):  # read alike: accepted
        validate_config(config(mscale=mscale, mscale_all_dim=all_dim))
    get_config("deepseek-v3-tiny", mscale=0.0, mscale_all_dim=1.0)  # ours: transformers' reading


def test_megatron_lm_rope_flags_read_differently_are_refused_on_both_routes():
    """Megatron's MLA scales attention by mscale(factor, mscale_all_dim)^2 under any rope type,
    ours only under YaRN: --rope-type rope with DeepSeek's YaRN flags left in was accepted with
    another attention temperature (x1.87 at factor 40). And the entry point (route b) builds a
    DeepSeekV3Config from Megatron-LM's arguments, which skipped the ambiguity check route a
    makes."""
    from types import SimpleNamespace

    from megatron_dsv3.attention.rope import get_mscale
    from megatron_dsv3.pretrain_gpt import config_from_args

    assert get_mscale(40.0, 1.0) ** 2 == pytest.approx(1.8739, rel=1e-4)  # Megatron's factor
    rope = dict(rope_type="rope", rotary_scaling_factor=40.0, mscale_all_dim=1.0)
    with pytest.raises(ValueError, match=r"rope_type='rope' with rotary_scaling_factor=40.0 and "
                                         r"mscale_all_dim=1.0: Megatron's MLA would still scale"):
        validate_config(_megatron_lm_config(**rope))
    validate_config(_megatron_lm_config(rope_type="rope", rotary_scaling_factor=40.0))
    args = SimpleNamespace(padded_vocab_size=256, seq_length=64, max_position_embeddings=64)
    for bad, message in ((rope, "Megatron's MLA would still scale"),
                         (dict(rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.0),
                          "is ambiguous")):
        with pytest.raises(ValueError, match=message):
            config_from_args(args, _megatron_lm_config(**bad))
