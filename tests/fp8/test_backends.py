"""The GEMM backend choice (fp8.backends, made in the binding layer_specs.gemm_strategy): auto on
this CPU machine is 'emulated'; 'torch' and 'te' are refused here, naming the field and the
reason; the choice is logged once; the decision for other machines (capabilities by hand)."""

import logging
import types

import pytest

from megatron_dsv3.configs import get_config
from megatron_dsv3.core.gemm import DEFAULT_GEMM
from megatron_dsv3.fp8 import backends
from megatron_dsv3.fp8.backends import Capabilities, choose_backend
from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm
from megatron_dsv3.fp8.torch_gemm import TorchBlockwiseGemm
from megatron_dsv3.layer_specs import gemm_strategy

H200 = Capabilities(cuda=True, device_name="NVIDIA H200", capability=(9, 0),
                    cuda_version=(12, 9), torch_version=(2, 13), blockwise_scaled_mm=True)
A100 = Capabilities(cuda=True, device_name="NVIDIA A100", capability=(8, 0),
                    cuda_version=(12, 9), torch_version=(2, 13), blockwise_scaled_mm=True)
CPU_ONLY = Capabilities(torch_version=(2, 13), blockwise_scaled_mm=True)


@pytest.fixture(autouse=True)
def _fresh_log(monkeypatch):
    monkeypatch.setattr(backends, "_LOGGED", set())


def test_auto_is_emulated_on_this_cpu_machine_and_the_binding_keeps_todays_gemms():
    assert not backends.probe().cuda  # this test machine (the suite runs on CPU)
    choice = choose_backend(None)
    assert choice.name == "emulated" and "no CUDA device" in choice.reason
    assert gemm_strategy(get_config("deepseek-v3-tiny")) is DEFAULT_GEMM
    g = gemm_strategy(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek"))
    assert type(g) is Fp8BlockwiseGemm and not g.pow2_scales
    g = gemm_strategy(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek-pow2",
                                 dsv3_gemm_backend="emulated"))
    assert type(g) is Fp8BlockwiseGemm and g.pow2_scales


@pytest.mark.parametrize("name, why", [("torch", "no CUDA device"),
                                       ("te", "Transformer Engine is not importable")])
def test_torch_and_te_are_refused_here_naming_the_field_and_the_reason(name, why):
    cfg = get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek", dsv3_gemm_backend=name)
    with pytest.raises(ValueError, match=rf"dsv3_gemm_backend='{name}' cannot run here: {why}"
                                         r".*Backends that can run here: 'emulated'"):
        gemm_strategy(cfg)


def test_unknown_backend_is_refused_at_configuration_time_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"dsv3_gemm_backend='cublas' is invalid: allowed values "
                                         r"are None \(auto\), 'emulated', 'torch', 'te'"):
        get_config("deepseek-v3-tiny", dsv3_gemm_backend="cublas")


def test_the_choice_is_logged_once_with_its_reason(caplog):
    cfg = get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek")
    with caplog.at_level(logging.INFO, logger="megatron_dsv3.fp8.backends"):
        for _ in range(3):
            gemm_strategy(cfg)  # every module built calls it
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_dsv3.fp8.backends"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("GEMM backend 'emulated' (dsv3_gemm_backend: auto): auto:")
    assert "'torch': no CUDA device" in lines[0]


def test_backend_names_are_the_configs_and_the_probe_needs_no_megatron_core():
    import subprocess
    import sys

    from megatron_dsv3.configs.config import GEMM_BACKENDS

    assert backends.GEMM_BACKENDS == GEMM_BACKENDS
    code = ("import sys; sys.modules['megatron'] = None; "
            "from megatron_dsv3.fp8.backends import choose_backend; "
            "print(choose_backend(None).name)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "emulated", proc.stderr[-2000:]


def test_decision_on_other_machines():
    assert choose_backend(None, H200).name == "torch"
    assert choose_backend("torch", H200).name == "torch"
    assert choose_backend(None, A100).name == "emulated"
    with pytest.raises(ValueError, match=r"'torch' cannot run here: the GPU \(NVIDIA A100, SM80\) "
                                         r"is not SM 9.x"):
        choose_backend("torch", A100)
    old = Capabilities(**{**H200.__dict__, "torch_version": (2, 8), "blockwise_scaled_mm": False})
    with pytest.raises(ValueError, match=r"torch 2.8 has no F.scaled_mm.*torch >= 2.10"):
        choose_backend("torch", old)
    old_cuda = Capabilities(**{**H200.__dict__, "cuda_version": (12, 4)})
    with pytest.raises(ValueError, match=r"CUDA \(12, 4\) is older than 12.9"):
        choose_backend("torch", old_cuda)
    with_te = Capabilities(**{**H200.__dict__, "te": True, "te_version": "2.8"})
    assert choose_backend(None, with_te).name == "te"
    assert choose_backend("torch", with_te).name == "torch"  # asked for: honoured
    with pytest.raises(ValueError, match="'te' cannot run here: no CUDA device"):
        choose_backend("te", Capabilities(te=True))
    # TE's FP8 block scaling needs SM >= 9.0 and CUDA >= 12.9: with the FP8 recipe, auto passes
    # over TE there (its autocast would assert at the first forward) and asking for it is refused
    a100_te = Capabilities(**{**A100.__dict__, "te": True, "te_version": "2.8"})
    assert choose_backend(None, a100_te).name == "te"  # BF16: TE runs on Ampere
    assert choose_backend(None, a100_te, fp8=True).name == "emulated"
    with pytest.raises(ValueError, match=r"'te' cannot run here: the FP8 recipe .* SM >= 9.0"):
        choose_backend("te", a100_te, fp8=True)
    h100_old_cuda_te = Capabilities(**{**old_cuda.__dict__, "te": True, "te_version": "2.8"})
    assert choose_backend(None, h100_old_cuda_te, fp8=True).name == "emulated"
    assert choose_backend(None, CPU_ONLY).name == "emulated"


def test_binding_maps_backend_and_recipe_to_the_gemm(monkeypatch):
    """On an H200 (capabilities by hand) the recipe runs on torch's kernels; without a recipe
    the plain GEMMs stay (BF16 experts take torch._grouped_mm in core.grouped_gemm)."""
    monkeypatch.setattr(backends, "probe", lambda: H200)
    g = gemm_strategy(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek-pow2"))
    assert type(g) is TorchBlockwiseGemm and g.pow2_scales
    assert gemm_strategy(get_config("deepseek-v3-tiny")) is DEFAULT_GEMM
    g = gemm_strategy(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek",
                                 dsv3_gemm_backend="emulated"))
    assert type(g) is Fp8BlockwiseGemm
    cfg = types.SimpleNamespace(dsv3_gemm_backend=None, dsv3_fp8_recipe="deepseek", fp8=None)
    monkeypatch.setattr(backends, "probe", lambda: A100)
    assert type(gemm_strategy(cfg)) is Fp8BlockwiseGemm
