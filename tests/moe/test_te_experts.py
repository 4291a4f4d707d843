"""The 'te' GEMM backend's wiring, on CPU with a stand-in `transformer_engine` (TE is CUDA-only):
the routed experts become TE GroupedLinear layers holding the same experts under the same
checkpoint keys, fed the tokens per expert as m_splits, and each half of the TE spec's layer
runs inside TE's autocast with our recipe (fp8_recipe_for_te). TE's numerics are not claimed:
the stand-in multiplies in plain torch, which is what lets its outputs be compared with
GroupedExperts' plain GEMMs."""

import contextlib
import dataclasses
import sys
import types
from typing import Callable, List, Optional, Union

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.fp8 import backends
from megatron_dsv3.fp8.quant import AMAX_FLOOR, GRAD_AMAX_FLOOR
from megatron_dsv3.testing.fake_te import te_recipe_module

H200_WITH_TE = backends.Capabilities(cuda=True, device_name="NVIDIA H200", capability=(9, 0),
                                     cuda_version=(12, 9), torch_version=(2, 13),
                                     blockwise_scaled_mm=True, te=True, te_version="stand-in")


class FakeTE:
    """Records what TE would be asked to do."""

    def __init__(self):
        self.active_recipe = None
        self.autocasts = []  # recipes entered
        self.calls = []  # (module name, m_splits, recipe active at the call)


def _fake_transformer_engine(fake: FakeTE):
    class GroupedLinear(torch.nn.Module):
        """TE's GroupedLinear signature (transformer_engine/pytorch/module/grouped_linear.py):
        weights weight0..weight{num_gemms-1} [out, in], init_method applied to each,
        forward(inp, m_splits, is_first_microbatch=None)."""

        def __init__(self, num_gemms: int, in_features: int, out_features: int,
                     sequence_parallel: bool = False, fuse_wgrad_accumulation: bool = False,
                     tp_group=None, tp_size: int = 1, get_rng_state_tracker=None,
                     rng_tracker_name: Optional[str] = None,
                     init_method: Optional[Callable] = None, bias: bool = True,
                     return_bias: bool = False, params_dtype: Optional[torch.dtype] = None,
                     parallel_mode: Optional[str] = None,
                     device: Union[torch.device, str] = "cuda", ub_overlap_rs: bool = False,
                     ub_overlap_ag: bool = False, ub_name: Optional[str] = None):
            super().__init__()
            assert not bias, "our experts have no bias"
            self.num_gemms = num_gemms
            for i in range(num_gemms):
                w = torch.nn.Parameter(torch.full((out_features, in_features), float("nan"),
                                                  dtype=params_dtype, device=device))
                if init_method is not None:
                    init_method(w)
                self.register_parameter(f"weight{i}", w)

        def forward(self, inp, m_splits: List[int], is_first_microbatch=None):
            assert len(m_splits) == self.num_gemms, "Number of splits should match number of GEMMs."
            if fake.active_recipe is not None and any(m % 16 for m in m_splits):
                # TE's FP8 block-scaling GEMM (cublaslt_gemm.cu, CanonicalizeGemmInput)
                raise RuntimeError(f"Caller must pad. m_splits={m_splits}")
            fake.calls.append((self, list(m_splits), fake.active_recipe))
            parts = torch.split(inp, m_splits)
            return torch.cat([p @ getattr(self, f"weight{i}").t() for i, p in enumerate(parts)])

    @contextlib.contextmanager
    def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None):
        previous = fake.active_recipe
        fake.active_recipe = recipe if enabled else None
        fake.autocasts.append(recipe)
        try:
            yield
        finally:
            fake.active_recipe = previous

    te = types.ModuleType("transformer_engine")
    te.__version__ = "stand-in"
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.GroupedLinear, pytorch.autocast = GroupedLinear, autocast
    common = types.ModuleType("transformer_engine.common")
    recipe = te_recipe_module()
    te.pytorch, te.common, common.recipe = pytorch, common, recipe
    return {"transformer_engine": te, "transformer_engine.pytorch": pytorch,
            "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}


@pytest.fixture
def fake_te(monkeypatch):
    fake = FakeTE()
    for name, module in _fake_transformer_engine(fake).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backends, "probe", lambda: H200_WITH_TE)
    monkeypatch.setattr(backends, "_LOGGED", set())
    return fake


def _experts(config, te_spec, **kw):
    from megatron_dsv3.layer_specs import RoutedExperts, gemm_strategy

    return RoutedExperts(config, num_local_experts=4, local_expert_offset=4,
                         key="layers.1.mlp.experts", te_spec=te_spec, gemm=gemm_strategy, **kw)


def test_te_experts_hold_the_same_experts_and_keys_and_get_counts_as_m_splits(fake_te,
                                                                            single_rank_world):
    from megatron_dsv3.moe.experts import GroupedExperts
    from megatron_dsv3.moe.te_experts import TEGroupedExperts

    config = get_config("deepseek-v3-tiny", use_cpu_initialization=True,
                        dsv3_gemm_backend="emulated")
    ours = _experts(config, te_spec=True)  # 'emulated' asked for: our experts, TE spec or not
    assert type(ours) is GroupedExperts
    config = get_config("deepseek-v3-tiny", use_cpu_initialization=True)  # auto -> 'te' here
    te = _experts(config, te_spec=True)
    assert type(te) is TEGroupedExperts
    assert type(_experts(config, te_spec=False)) is GroupedExperts  # our modules' spec
    # the same keyed experts (global experts 4..7), in TE's per-expert weights
    for e in range(4):
        assert torch.equal(te.linear_fc1.get_parameter(f"weight{e}"), ours.fc1_weight[e])
        assert torch.equal(te.linear_fc2.get_parameter(f"weight{e}"), ours.fc2_weight[e])
    assert all(getattr(p, "allreduce", True) is False for p in te.parameters())
    # the checkpoint: the same stacked keys and values both ways
    sd = te.state_dict()
    assert set(sd) == set(ours.state_dict()) == {"fc1_weight", "fc2_weight"}
    assert torch.equal(sd["fc1_weight"], ours.fc1_weight) and torch.equal(sd["fc2_weight"],
                                                                          ours.fc2_weight)
    other = _experts(get_config("deepseek-v3-tiny", use_cpu_initialization=True, init_seed=7),
                     te_spec=True)
    other.load_state_dict(ours.state_dict())
    assert torch.equal(other.linear_fc2.weight3, ours.fc2_weight[3])
    sharded = te.sharded_state_dict(prefix="decoder.layers.1.mlp.experts.")
    offsets = sorted((v.key, v.global_offset, v.global_shape) for v in sharded.values())
    assert offsets[0] == ("decoder.layers.1.mlp.experts.fc1_weight", (4, 0, 0),
                          (config.num_moe_experts, *ours.fc1_weight.shape[1:]))
    assert len(offsets) == 8
    # forward: tokens per expert become m_splits; the same SwiGLU experts as ours
    counts = [3, 0, 5, 2]
    rows = torch.randn(sum(counts), config.hidden_size)
    torch.testing.assert_close(te(rows, counts), ours(rows, counts))
    assert [c[1] for c in fake_te.calls] == [counts, counts]
    assert [c[0] for c in fake_te.calls] == [te.linear_fc1, te.linear_fc2]


def test_te_experts_pad_each_experts_rows_for_fp8(fake_te, single_rank_world):
    """TE's FP8 block-scaling grouped GEMM needs row counts that are multiples of 16 (the
    stand-in raises TE's "Caller must pad"): under the recipe each expert's rows are padded with
    zero rows, and the outputs and gradients are the unpadded experts' (against our experts in
    high precision: the stand-in's GEMMs are not FP8)."""
    from megatron_dsv3.fp8.te_autocast import te_fp8_autocast

    config = get_config("deepseek-v3-tiny", use_cpu_initialization=True,
                        dsv3_fp8_recipe="deepseek")
    te = _experts(config, te_spec=True)
    plain = _experts(get_config("deepseek-v3-tiny", use_cpu_initialization=True), te_spec=True)
    counts = [3, 0, 17, 2]
    rows = torch.randn(sum(counts), config.hidden_size, requires_grad=True)
    with te_fp8_autocast(config):
        out = te(rows, counts)
    assert [c[1] for c in fake_te.calls] == [[16, 0, 32, 16]] * 2  # padded per expert
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref_rows = rows.detach().clone().requires_grad_()
    ref = plain(ref_rows, counts)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rows.grad, ref_rows.grad)
    for a, b in zip(te.expert_weights("fc1") + te.expert_weights("fc2"),
                    plain.expert_weights("fc1") + plain.expert_weights("fc2")):
        torch.testing.assert_close(a.grad, b.grad)


def test_te_fp8_autocast_enters_our_recipe_only_on_the_te_backend(fake_te):
    from megatron_dsv3.fp8.te_autocast import te_fp8_autocast, te_fp8_recipe

    cfg = get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek-pow2")
    with te_fp8_autocast(cfg):
        recipe = fake_te.active_recipe
    assert (recipe.x_block_scaling_dim, recipe.w_block_scaling_dim,
            recipe.grad_block_scaling_dim) == (1, 2, 1)
    assert recipe.fp8_quant_fwd_inp.power_2_scale and recipe.fp8_quant_bwd_grad.power_2_scale
    assert recipe.fp8_quant_fwd_inp.amax_epsilon == AMAX_FLOOR
    assert recipe.fp8_quant_bwd_grad.amax_epsilon == GRAD_AMAX_FLOOR
    assert not te_fp8_recipe(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek")
                             ).fp8_quant_fwd_weight.power_2_scale
    # no recipe, or another backend: no TE autocast at all
    for c in (get_config("deepseek-v3-tiny"),
              get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek",
                         dsv3_gemm_backend="torch")):
        assert te_fp8_recipe(c) is None
        with te_fp8_autocast(c):
            assert fake_te.active_recipe is None
    assert len(fake_te.autocasts) == 1


def test_each_half_of_the_te_specs_layer_runs_inside_te_autocast(fake_te, single_rank_world,
                                                               monkeypatch):
    """The TE spec with our local modules in TE's places (TE's own modules need CUDA): the
    layer class, the experts and the autocast around both halves are what the 'te' backend
    builds; the routed experts' GroupedLinear calls happen under our recipe."""
    from types import SimpleNamespace

    from megatron_dsv3 import layer_specs
    from megatron_dsv3.moe.te_experts import TEGroupedExperts

    local = layer_specs.backend(False)
    # an H200 with TE and a torch without the blockwise scaled_mm: our stand-in linears take the
    # emulation ('torch' cannot run), TE's FP8 block scaling can (SM 9.0, CUDA 12.9)
    old_torch = dataclasses.replace(H200_WITH_TE, torch_version=(2, 8), blockwise_scaled_mm=False)
    monkeypatch.setattr(backends, "probe", lambda: old_torch)
    monkeypatch.setattr(layer_specs, "backend",
                        lambda use_te=None: SimpleNamespace(**{**vars(local), "name": "te"}))
    config = get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek",
                        use_cpu_initialization=True)
    spec = layer_specs.get_layer_spec(config)
    assert spec.module is layer_specs.TEAutocastLayer
    layer = spec.module(config, spec.submodules, layer_number=2)
    assert layer.is_moe_layer and isinstance(layer.mlp.experts, TEGroupedExperts)
    x = torch.randn(6, 2, config.hidden_size)
    out, _ = layer(x)
    out.sum().backward()
    assert fake_te.calls and all(c[2] is layer.te_fp8_recipe for c in fake_te.calls)
    assert fake_te.autocasts == [layer.te_fp8_recipe] * 2  # the attention half, the MoE half
    plain = layer_specs.get_layer_spec(get_config("deepseek-v3-tiny", use_cpu_initialization=True))
    assert plain.module is layer_specs.TEAutocastLayer  # no recipe: the context stays null
    assert spec.module(get_config("deepseek-v3-tiny"), plain.submodules,
                       layer_number=1).te_fp8_recipe is None


def test_te_experts_without_transformer_engine_name_the_field(monkeypatch, single_rank_world):
    from megatron_dsv3.moe.te_experts import TEGroupedExperts

    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(ImportError, match="set dsv3_gemm_backend to 'emulated' or 'torch'"):
        TEGroupedExperts(get_config("deepseek-v3-tiny"), num_local_experts=2)


def test_te_spec_never_runs_bf16_linears_beside_fp8_experts(fake_te, single_rank_world,
                                                            monkeypatch):
    """TE present but its FP8 block scaling cannot run here (an A100): the automatic spec is ours
    (it was TE's: TE linears in BF16, our experts in FP8); asked for explicitly, the TE layer
    with our recipe on another backend is refused naming the fields."""
    from types import SimpleNamespace

    from megatron_dsv3 import compat, layer_specs

    a100 = dataclasses.replace(H200_WITH_TE, device_name="NVIDIA A100", capability=(8, 0))
    monkeypatch.setattr(backends, "probe", lambda: a100)
    monkeypatch.setattr(compat, "use_transformer_engine", lambda: True)
    fp8 = get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek", use_cpu_initialization=True)
    assert layer_specs._use_te(fp8, None) is False
    assert layer_specs._use_te(get_config("deepseek-v3-tiny"), None) is None  # BF16: TE's
    local = layer_specs.backend(False)
    monkeypatch.setattr(layer_specs, "backend",
                        lambda use_te=None: SimpleNamespace(**{**vars(local), "name": "te"}))
    spec = layer_specs.get_layer_spec(fp8, use_te=True)
    with pytest.raises(ValueError, match="'te' GEMM backend; here it is 'emulated'"):
        spec.module(fp8, spec.submodules, layer_number=2)
