"""The recipe switch, the Transformer Engine adapter and FP8 in a whole model."""

import collections
import types

import pytest
import torch

from megatron_dsv3 import compat
from megatron_dsv3.configs import get_config
from megatron_dsv3.core.gemm import DEFAULT_GEMM
from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm
from megatron_dsv3.fp8.quant import AMAX_FLOOR, GRAD_AMAX_FLOOR
from megatron_dsv3.fp8.recipe import FP8Recipe, recipe_from_config
from megatron_dsv3.layer_specs import gemm_strategy

# every GEMM-owning module kind of deepseek-v3-tiny (MLA with query compression, dense MLP,
# shared expert, routed experts, MTP projection)
FP8_KINDS = {"linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
             "linear_proj", "linear_fc1", "linear_fc2", "experts", "eh_proj"}


def test_dsv3_fp8_recipe_switches_our_gemms_and_names_bad_values():
    assert gemm_strategy(get_config("deepseek-v3-tiny")) is DEFAULT_GEMM
    g = gemm_strategy(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek-pow2"))
    assert isinstance(g, Fp8BlockwiseGemm) and g.pow2_scales
    with pytest.raises(ValueError, match="dsv3_fp8_recipe='e5m2'.*'deepseek', 'deepseek-pow2'"):
        get_config("deepseek-v3-tiny", dsv3_fp8_recipe="e5m2")
    r = recipe_from_config(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek"))
    assert r == FP8Recipe(pow2_scales=False)
    assert r.activation_tile == r.gradient_tile == (1, 128) and r.weight_block == (128, 128)
    assert set(r.high_precision) == {"embedding", "output_layer", "router", "norm",
                                     "core_attention"}



@pytest.mark.parametrize("field,value", [("fmt", "e5m2"), ("gradient_tile", (128, 128)),
                                         ("weight_block", (64, 64)), ("accumulate", "bf16"),
                                         ("high_precision", ()), ("activation_tile", (1, 64)),
                                         ("pow2_scales", 1)])
def test_recipe_fields_the_gemms_would_not_honour_are_refused_naming_the_field(field, value):
    """The GEMMs implement DeepSeek-V3's recipe and read pow2_scales only: any other value of the
    documenting fields was accepted and silently ignored (the same GEMMs as the default)."""
    with pytest.raises(ValueError, match=rf"FP8Recipe\.{field}=.*allowed"):
        FP8Recipe(**{field: value})
    FP8Recipe(pow2_scales=True)  # the one field that varies

@pytest.mark.skipif(compat.te_importable(), reason="Transformer Engine is importable here")
def test_megatron_fp8_without_transformer_engine_is_refused_at_configuration_time():
    """megatron-core itself would fail with a TypeError (MoE) or silently run in high precision."""
    with pytest.raises(ValueError, match="fp8='e4m3' needs Transformer Engine.*dsv3_fp8_recipe"):
        get_config("deepseek-v3-tiny", fp8="e4m3", fp8_recipe="blockwise")


def test_megatron_fp8_blockwise_with_transformer_engine_maps_to_our_recipe(monkeypatch):
    monkeypatch.setattr(compat, "te_importable", lambda: True)
    cfg = types.SimpleNamespace(dsv3_fp8_recipe=None, fp8="e4m3", fp8_recipe="blockwise")
    monkeypatch.delenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", raising=False)
    assert recipe_from_config(cfg) == FP8Recipe(pow2_scales=True)  # TE's default: power of 2
    monkeypatch.setenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "1")
    assert recipe_from_config(cfg) == FP8Recipe(pow2_scales=False)
    cfg.fp8_recipe = "delayed"
    with pytest.raises(ValueError, match="fp8_recipe='delayed'.*'blockwise'"):
        recipe_from_config(cfg)
    cfg.fp8, cfg.fp8_recipe = "hybrid", "blockwise"  # E5M2 gradients in TE, E4M3 in our experts
    with pytest.raises(ValueError, match="fp8='hybrid'.*allowed value.*'e4m3'"):
        recipe_from_config(cfg)
    # both switches: the TE layers would run Megatron's recipe and the routed experts ours
    for fp8_recipe in ("blockwise", "delayed"):
        cfg.fp8, cfg.fp8_recipe, cfg.dsv3_fp8_recipe = "e4m3", fp8_recipe, "deepseek"
        with pytest.raises(ValueError, match="both set.*Allowed: one of them"):
            recipe_from_config(cfg)
    cfg.fp8 = None  # ours alone
    assert recipe_from_config(cfg) == FP8Recipe(pow2_scales=False)


@pytest.mark.skipif(compat.te_importable(), reason="Transformer Engine is importable here")
def test_both_fp8_switches_without_transformer_engine_are_refused_by_name():
    """Before: our recipe skipped Megatron's checks and megatron-core failed with a TypeError."""
    with pytest.raises(ValueError, match="dsv3_fp8_recipe='deepseek' and fp8='e4m3'"):
        get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek", fp8="e4m3",
                   fp8_recipe="blockwise")


def test_te_recipe_carries_the_scale_choice_past_the_constructor(monkeypatch):
    """Transformer Engine is GPU-only; a stand-in with TE 2.x's structure (QParams as class
    attributes computed at import, a `use_f32_scales` field the constructor accepts and ignores)
    checks that the adapter sets what TE actually reads."""
    import sys

    from megatron_dsv3.fp8.recipe import fp8_recipe_for_te
    from megatron_dsv3.testing.fake_te import te_recipe_module

    recipe_mod = te_recipe_module()
    QParams, Format = recipe_mod.QParams, recipe_mod.Format
    Float8BlockScaling = recipe_mod.Float8BlockScaling
    for name in ("transformer_engine", "transformer_engine.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe_mod)
    for pow2 in (False, True):
        te = fp8_recipe_for_te(FP8Recipe(pow2_scales=pow2))
        assert te.fp8_format is Format.E4M3
        # 1x128 activations and gradients, 128x128 weights
        dims = (te.x_block_scaling_dim, te.w_block_scaling_dim, te.grad_block_scaling_dim)
        assert dims == (1, 2, 1)
        assert te.fp8_quant_fwd_inp == QParams(power_2_scale=pow2, amax_epsilon=AMAX_FLOOR)
        assert te.fp8_quant_fwd_weight == QParams(power_2_scale=pow2, amax_epsilon=AMAX_FLOOR)
        assert te.fp8_quant_bwd_grad == QParams(power_2_scale=pow2, amax_epsilon=GRAD_AMAX_FLOOR)
    assert Float8BlockScaling.fp8_quant_fwd_inp == QParams(power_2_scale=True)  # class untouched


def test_every_linear_of_mla_mlp_experts_and_mtp_runs_all_three_gemms_in_fp8(single_rank_world,
                                                                            monkeypatch):
    """One training step of the tiny model with the recipe on: each GEMM-owning module runs
    fprop, dgrad and wgrad through Fp8BlockwiseGemm, and no high-precision module owns one."""
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek"))
    owner = {id(m.gemm): n for n, m in model.named_modules()
             if isinstance(getattr(m, "gemm", None), Fp8BlockwiseGemm)}
    assert {n.split(".")[-1] for n in owner.values()} == FP8_KINDS
    assert not any(k in n for n in owner.values() for k in ("embedding", "output_layer", "router",
                                                            "norm", "core_attention"))
    calls = collections.defaultdict(set)
    for kind in ("fprop", "dgrad", "wgrad"):
        def spy(self, a, b, _kind=kind, _orig=getattr(Fp8BlockwiseGemm, kind)):
            calls[owner[id(self)]].add(_kind)
            return _orig(self, a, b)

        monkeypatch.setattr(Fp8BlockwiseGemm, kind, spy)
    ids = torch.randint(0, 256, (2, 32))
    model(ids, torch.arange(32).expand(2, 32), None, labels=ids).mean().backward()
    missing = {n: {"fprop", "dgrad", "wgrad"} - calls[n] for n in owner.values()
               if calls[n] != {"fprop", "dgrad", "wgrad"}}
    assert not missing, missing


def test_fp8_model_stays_close_to_the_full_precision_model(single_rank_world):
    from megatron_dsv3.model import build_model

    ids = torch.randint(0, 256, (2, 32))
    pos = torch.arange(32).expand(2, 32)
    losses, grads = [], []
    for recipe in (None, "deepseek"):
        model = build_model(get_config("deepseek-v3-tiny", dsv3_fp8_recipe=recipe))
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # same weights (keyed init), different GEMM numerics: close but not identical
    assert 0 < abs(losses[0] - losses[1]) / losses[0] < 1e-3
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert 0.99 < cos < 1.0, cos
