"""A rank dying mid-run ends the whole torchrun job quickly with a clear message; restarting
from the last checkpoint continues with the losses of the uninterrupted run."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _torchrun(tmp, save_dir, extra, env_extra=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29600 + os.getpid() % 300),
           os.path.join(ROOT, "examples", "pretrain_tiny.py"), "--steps", "6", "--pp", "2",
           "--micro-batches", "4", "--micro-batch-size", "2", "--seq-length", "16",
           "--corpus-bytes", str(1 << 19), "--cache-dir", str(tmp / "cache"), "--save-dir",
           str(save_dir), "--save-interval", "2", "--log-interval", "1", "--warmup-steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    start = time.time()
    proc = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.time() - start


def _losses(save_dir):
    return {r["step"]: r["lm_loss"] for r in map(json.loads, open(save_dir / "metrics.jsonl"))}


@pytest.mark.timeout(900)
def test_killed_rank_ends_job_and_restart_continues_identically(tmp_path):
    straight, _ = _torchrun(tmp_path, tmp_path / "straight", [])
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed, seconds = _torchrun(tmp_path, tmp_path / "run", [],
                                 {"MEGATRON_DSV3_KILL_RANK_AT": "1:3"})
    assert crashed.returncode != 0
    out = crashed.stdout + crashed.stderr
    assert "rank 1 dies after step 3" in out and "ChildFailedError" in out  # torchrun's report
    assert seconds < 300  # no hang: torchrun tears the surviving rank down
    resumed, _ = _torchrun(tmp_path, tmp_path / "run",
                           ["--resume"])  # the last published checkpoint: step 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "run")
    for step in range(3, 7):  # steps after the checkpoint, recomputed after the restart
        assert got[step] == want[step], (step, got[step], want[step])
