"""FP8 GEMMs of a linear layer and the recipe switch."""

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.core.gemm import DEFAULT_GEMM, linear
from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm
from megatron_dsv3.fp8.quant import (
    blockwise_matmul,
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
)
from megatron_dsv3.fp8.recipe import FP8Recipe, gemm_for_config, recipe_from_config


def q1(t, floor=1e-4):
    return dequantize_1x128(*quantize_1x128(t, amax_floor=floor)).double()


def qb(w):
    return dequantize_128x128(*quantize_128x128(w)).double()


def test_fprop_dgrad_wgrad_each_equal_their_quantised_float64_reference():
    torch.manual_seed(0)
    M, N, K = 40, 72, 200
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    dy = torch.randn(M, N)
    gemm = Fp8BlockwiseGemm()
    y = linear(x, w, gemm)
    y.backward(dy)
    torch.testing.assert_close(y.double(), q1(x.detach()) @ qb(w.detach()).t(), rtol=1e-5, atol=1e-4)
    # dgrad: dy tiled along N (its last dim), W in the same 128x128 blocks
    torch.testing.assert_close(x.grad.double(), q1(dy, 1e-30) @ qb(w.detach()), rtol=1e-5,
                               atol=1e-4)
    # wgrad: dy^T and x^T tiled along M, the tokens
    torch.testing.assert_close(w.grad.double(), q1(dy.t(), 1e-30) @ q1(x.detach().t()).t(),
                               rtol=1e-5, atol=1e-4)


def test_tiny_gradients_keep_their_precision():
    """Gradients of 1e-7 are far below the activation amax floor of 1e-4."""
    dy = torch.randn(8, 256) * 1e-7
    gemm = Fp8BlockwiseGemm()
    w = torch.randn(256, 128)
    exact = dy.double() @ w.double()
    got = gemm.dgrad(dy, w).double()
    assert ((got - exact).norm() / exact.norm()) < 0.06


def test_emulated_fprop_equals_blockwise_matmul_with_promotion():
    x, w = torch.randn(24, 384), torch.randn(256, 384)
    gemm = Fp8BlockwiseGemm()
    ref = blockwise_matmul(*quantize_1x128(x), *quantize_128x128(w), out_dtype=torch.float32)
    torch.testing.assert_close(gemm.fprop(x, w), ref, rtol=1e-5, atol=1e-4)


def test_recipe_is_switched_on_by_config_and_names_bad_values():
    assert gemm_for_config(get_config("deepseek-v3-tiny")) is DEFAULT_GEMM
    g = gemm_for_config(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek-pow2"))
    assert isinstance(g, Fp8BlockwiseGemm) and g.pow2_scales
    with pytest.raises(ValueError, match="dsv3_fp8_recipe"):
        get_config("deepseek-v3-tiny", dsv3_fp8_recipe="e5m2")
    r = recipe_from_config(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek"))
    assert r == FP8Recipe(pow2_scales=False)
    assert r.activation_tile == (1, 128) and r.weight_block == (128, 128)
    assert set(r.high_precision) == {"embedding", "output_layer", "router", "norm", "core_attention"}


def test_every_linear_of_mla_mlp_and_experts_runs_fp8_and_nothing_else(single_rank_world):
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek"))
    fp8 = {n for n, m in model.named_modules() if isinstance(getattr(m, "gemm", None), Fp8BlockwiseGemm)}
    kinds = {n.split(".")[-1] for n in fp8}
    assert kinds >= {"linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                     "linear_kv_up_proj", "linear_proj", "linear_fc1", "linear_fc2", "experts",
                     "eh_proj"}
    # the high-precision modules never own an FP8 GEMM
    assert not any(k in n for n in fp8 for k in ("embedding", "output_layer", "router", "norm",
                                                 "core_attention"))


def test_fp8_model_trains_close_to_the_full_precision_model(single_rank_world):
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
    assert abs(losses[0] - losses[1]) / losses[0] < 1e-3
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99, cos


def test_te_recipe_carries_the_scale_choice_past_the_constructor(monkeypatch):
    """Transformer Engine is GPU-only; a stand-in with TE 2.x's structure (QParams as class
    attributes, constructor ignoring the scale choice) checks our adapter's handling."""
    import dataclasses
    import enum
    import sys
    import types

    from megatron_dsv3.fp8.recipe import to_te_recipe

    @dataclasses.dataclass(frozen=True)
    class QParams:
        power_2_scale: bool = False
        amax_epsilon: float = 0.0

    class Format(enum.Enum):
        E4M3 = "e4m3"

    class Float8BlockScaling:
        fp8_quant_fwd_inp = QParams(power_2_scale=True)
        fp8_quant_fwd_weight = QParams(power_2_scale=True)
        fp8_quant_bwd_grad = QParams(power_2_scale=True)

        def __init__(self, fp8_format, x_block_scaling_dim, w_block_scaling_dim,
                     grad_block_scaling_dim, **ignored):
            self.dims = (x_block_scaling_dim, w_block_scaling_dim, grad_block_scaling_dim)

    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    recipe_mod.Float8BlockScaling, recipe_mod.Format = Float8BlockScaling, Format
    for name in ("transformer_engine", "transformer_engine.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe_mod)
    te = to_te_recipe(FP8Recipe(pow2_scales=False))
    assert te.dims == (1, 2, 1)  # 1x128 activations and gradients, 128x128 weights
    for attr in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
        assert getattr(te, attr) == QParams(power_2_scale=False, amax_epsilon=1e-4)
    assert Float8BlockScaling.fp8_quant_fwd_inp.power_2_scale  # the class default is untouched
