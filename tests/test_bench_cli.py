"""The benchmark scripts run and refuse bad input by flag (their measurements are recorded in
docs/benchmarks.md, not asserted here): the smallest run of the all-to-all overlap benchmark, and
refusals that used to be tracebacks, silently ignored flags or wrong numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*argv, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_all_to_all_overlap_benchmark_runs():
    """It called the time-dilated chunk with an argument list that had changed (every run
    failed)."""
    out = bench("pipeline_a2a_overlap.py", "--pp", "2", "--F", "0.002", "--B", "0.004", "--W",
                "0.002", "--A", "0.001")
    assert out.returncode == 0, out.stderr[-3000:]
    for schedule in ("megatron_1f1b", "ours_dualpipev_sequential", "ours_dualpipev_overlapped"):
        assert f"| 2 | 8 | {schedule} |" in out.stdout, out.stdout


def test_causal_attention_benchmark_runs():
    out = bench("causal_attention.py", "--shape", "1,2,16,8,4", "--blocks", "4", "--reps", "1",
                "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"shape": [1, 2, 16, 8, 4]' in out.stdout and "blocked_4_ms" in out.stdout


def test_cpu_gemm_benchmark_runs():
    """Both kernels timed at a tiny shape, both within float32 rounding of the float64 product."""
    from megatron_dsv3.core import gemm

    if gemm.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear kernel")
    out = bench("cpu_gemm.py", "--shape", "8,16,4", "--reps", "1", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)["rows"]
    assert [r["pass"] for r in rows] == ["fprop", "dgrad", "wgrad"]
    for row in rows:
        assert row["torch"]["max_rel_err"] < 1e-5 and row["onednn"]["max_rel_err"] < 1e-5


@pytest.mark.parametrize("argv,message", [
    (["pipeline_timedilated.py", "--pp", "2", "--B", "0.002", "--W", "0.01"],
     "--W 0.01 is invalid: allowed values are 0 <= W <= --B 0.002"),
    (["pipeline_timedilated.py", "--pp", "2", "--repeat", "3"],
     "--repeat apply to the comparison with --dualpipe-ref only"),
    (["fp8_vs_bf16.py", "--steps", "2", "--last", "5"],
     "--last 5 is invalid: allowed values are 1 to --steps 2"),
    (["export_quality.py", "--run", "/nonexistent"], "--run /nonexistent: no trainer checkpoint"),
    (["checkpoint_convert.py", "--gb", "-5"], "-5 is invalid: allowed values are numbers > 0"),
    (["gpu_check.py", "--budget", "0"], "--budget 0.0 is invalid"),
    (["fp8_fidelity.py", "--part", "seeds", "--seeds", "1"], "--seeds 1 is invalid"),
    (["causal_attention.py", "--blocks", "256"], "--blocks [256] is invalid for s=256"),
    (["causal_attention.py", "--shape", "4,8,64,16,32"], "allowed are positive sizes with dv <= d"),
    (["pipeline_ab.py", "/nonexistent", "."], "tree_a='/nonexistent': no megatron_dsv3"),
    (["cold_after_sleep.py", "--reps", "0"], "0 is invalid: allowed values are integers >= 1"),
    (["pipeline_ab.py", ".", ".", "--pp", "4", "--microbatches", "6"],
     "--schedule/--pp/--microbatches: "),
])
def test_bench_scripts_refuse_bad_input_by_flag(argv, message):
    out = bench(*argv, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_pipeline_ab_runs_both_trees_interleaved():
    """The smallest A/B (this tree against itself): one run per tree, each in fresh spawned
    processes importing megatron_dsv3 from its tree, the paired difference reported."""
    out = bench("pipeline_ab.py", str(ROOT), str(ROOT), "--pp", "2", "--microbatches", "4",
                "--pairs", "1", "--F", "0.002", "--B", "0.004", "--W", "0.002", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert len(got["a_runs_ms"]) == len(got["b_runs_ms"]) == 1
    assert got["paired_diff_median_ms"] == pytest.approx(got["b_runs_ms"][0] - got["a_runs_ms"][0])
    # a bubble holds at least the warm-up (rank 1 waits one 2 ms forward); seconds would be a hang
    assert all(2.0 < b < 1000.0 for b in got["a_runs_ms"] + got["b_runs_ms"])


def test_train_step_against_hf_runs_with_equal_work_flags():
    """The smallest run of the comparison with HF transformers, MTP and the aux loss off (HF's
    training forward has neither): both sides take a step, and the settings are reported."""
    pytest.importorskip("transformers")
    out = bench("train_step_vs_hf.py", "--size", "tiny", "--batch", "1", "--seq", "16",
                "--steps", "1", "--no-mtp", "--no-aux-loss", "--threads", "1", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mtp"] is False and result["aux_loss"] is False
    assert result["params_ours"] == result["params_hf"]
    assert result["tokens_per_s_ours"] > 0 and result["tokens_per_s_hf"] > 0


def _load_timedilated():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pipeline_timedilated", ROOT / "bench" / "pipeline_timedilated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed_dualpipev(rank, world):
    bench_module = _load_timedilated()
    return bench_module._run(rank, world, "ours_dualpipev", 0.004, 0.008, 0.004, 4, 1.0, 2,
                             "tagged")


def test_time_dilated_breakdown_parts_fit_inside_the_iteration(single_rank_world):
    """What the time-dilated benchmark splits a bubble into is measured, not derived: the
    harness sleeps at least what it asks, our executor's receive waits are disjoint from the
    sleeps, and both fit in the iteration; the split adds up to the bubble."""
    from megatron_dsv3.testing.distributed import run_distributed

    res = run_distributed(_timed_dualpipev, 2,
                          megatron_parallel={"pipeline_model_parallel_size": 2})
    for wall, compute, extra in res:
        assert compute == pytest.approx(2 * 4 * (0.004 + 0.008))  # 2 chunks, 4 micro-batches
        assert extra["slept_s"] >= compute and extra["recv_wait_s"] >= 0.0
        assert wall >= extra["slept_s"] + extra["recv_wait_s"]
    part = _load_timedilated()._breakdown(res)
    assert part["bubble_ms"] == pytest.approx(part["sleep_overshoot_ms"] + part["recv_wait_ms"]
                                              + part["other_ms"])
    assert part["bubble_ms"] == pytest.approx(max(w - c for w, c, _ in res) * 1e3)
