"""bench/gpu_check.{sh,py}, the one prepared GPU run: its CPU rehearsal passes without
megatron-core, and the shell wrapper leaves its results under $OUT."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WITHOUT_MEGATRON = ("import runpy, sys; sys.modules['megatron'] = None; "
                    "sys.argv = ['bench/gpu_check.py'] + sys.argv[1:]; "
                    "runpy.run_path('bench/gpu_check.py', run_name='__main__')")


def test_dry_run_without_megatron_core_passes_every_required_section(tmp_path):
    """The device has no megatron-core: the required sections must not import it."""
    proc = subprocess.run([sys.executable, "-c", WITHOUT_MEGATRON, "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["environment"]["megatron.core"].startswith("absent")
    assert res["quantisers"]["pass"] is True
    assert res["fp8_gemm_on_device"]["pass"] is True
    # torch's blockwise GEMM is CUDA-only, but its shape/stride checks (meta kernels) already
    # accept the scale layouts we hand it, for both APIs and both operand layouts
    blockwise = res["torch_blockwise_scaled_mm"]
    layouts = [v["meta_layout_check"] for v in blockwise.values() if isinstance(v, dict)]
    assert len(layouts) == 2 and all(set(v.values()) == {"accepted"} for v in layouts), layouts
    # (1) the 'torch' backend's GEMMs equal the emulation through the kernel's layouts (the CPU
    # stand-in here, torch's meta kernel checking every call's arguments)
    backend = res["torch_backend_gemms"]
    assert backend["pass"] is True and backend["kernel"].startswith("CPU stand-in")
    assert backend["worst_rel_diff"] < 1e-6
    grouped = res["gemm_throughput"]["grouped 32 experts"]
    assert grouped["fp8_torch_backend_tflops"] > 0 and grouped["bf16_grouped_mm_tflops"] > 0
    for row in res["gemm_throughput"].values():
        if isinstance(row, dict) and "bf16_tflops" in row:
            assert row["bf16_tflops"] > 0 and row["emulated_fp8_tflops"] > 0
            assert row["fp8_tensorwise_tflops"] > 0  # torch._scaled_mm runs per-tensor on CPU
    for name in ("model_on_device_vs_cpu", "training_step_throughput", "full_width_layer",
                 "training_50_steps"):
        assert "megatron-core not importable" in res[name]["skipped"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| quantisers | PASS |" in summary and "| fp8_gemm_on_device | PASS |" in summary
    assert "| torch_backend_gemms | PASS |" in summary


def test_shell_wrapper_writes_results_under_out_and_passes_the_exit_code(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WHEELS=str(tmp_path / "none"))
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--sections", "quantisers"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["quantisers"]["pass"] is True
    assert (out / "summary.md").exists() and (out / "gpu_check.log").exists()
    assert "exit code 0" in proc.stdout


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench",
                                                                             "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sections_do_not_start_once_the_time_budget_is_spent(tmp_path, monkeypatch):
    gc = _gpu_check_module()
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run", "--budget", "1e-9", "--out",
                                      str(tmp_path), "--sections", "quantisers"])
    gc.main()
    res = json.loads((tmp_path / "results.json").read_text())
    assert "time budget" in res["quantisers"]["skipped"]


def test_unknown_section_names_the_allowed_ones(tmp_path, monkeypatch):
    gc = _gpu_check_module()
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path), "--sections",
                                      "no_such_section"])
    with pytest.raises(SystemExit, match="no_such_section.*quantisers"):
        gc.main()
