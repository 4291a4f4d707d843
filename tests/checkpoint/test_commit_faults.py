"""A kill -9 at any file operation of the commit protocol never costs the last published
checkpoint: the trainer's next run resumes from it with the uninterrupted run's losses, and an
interrupted conversion leaves its output either the old or the new complete directory.

tests/checkpoint/fault_harness.py kills a child process (SIGKILL) at each fault point in turn
(every file operation of megatron_dsv3.checkpoint.commit passes one) and runs the next job."""

import json
import os
import subprocess
import sys

import pytest

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_harness.py")


def _harness(kind, work):
    proc = subprocess.run([sys.executable, HARNESS, kind, str(work)], capture_output=True,
                          text=True, timeout=800, env=dict(os.environ, PYTHONWARNINGS="ignore",
                                                           OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.timeout(900)
def test_trainer_killed_at_every_file_operation_resumes_from_the_last_published(tmp_path):
    *records, summary = _harness("trainer", tmp_path)
    reference = {int(k): v for k, v in summary["reference"].items()}
    assert summary["points"] == len(records) >= 18  # two saves and a prune, every operation
    publishes = [r["point"] for r in records if r["label"].startswith("tracker: rename over")]
    assert len(publishes) == 2  # the checkpoints of steps 2 and 4
    for r in records:
        where = f"killed at point {r['point']} ({r['label']})"
        assert r["exit"] == -9, where
        assert "published_error" not in r, (where, r.get("published_error"))
        # published = the last save whose tracker rename had happened before the kill
        expected = 4 if r["point"] > publishes[1] else 2 if r["point"] > publishes[0] else None
        assert r["published"] == expected, where
        assert r["next_exit"] == 0 and r["next"]["ok"], (where, r["next"])
        assert r["resumed_at"] == (expected or 0), where
        assert r["identical"], (where, r["next"]["value"], reference)
        assert r["leftovers"] == [], where  # the next run cleared every partial directory


@pytest.mark.timeout(900)
def test_conversion_killed_at_every_file_operation_leaves_old_or_new_output(tmp_path):
    *records, summary = _harness("convert", tmp_path)
    assert summary["source_intact"]
    kinds = {}
    for r in records:
        kinds.setdefault(r["kind"], []).append(r)
    assert set(kinds) == {"hf2dist-overwrite", "hf2dist-fresh", "hf2dist-noexchange-overwrite",
                          "dist2hf-overwrite"}
    for kind, rows in kinds.items():
        before = "absent" if kind.endswith("fresh") else "old"
        states = [r["state"] for r in rows]
        # every kill leaves the complete old output (or none, when there was none) or the
        # complete new one, and the switch happens once: at the publishing operation
        assert set(states) <= {before, "new"}, (kind, states)
        switch = states.index("new")
        assert states == [before] * switch + ["new"] * (len(states) - switch), (kind, states)
        assert "publish" in rows[switch - 1]["label"] or "fallback" in rows[switch - 1]["label"]
        for r in rows:
            assert r["exit"] == -9 and r["rerun"] == "new" and r["leftovers"] == [], r
