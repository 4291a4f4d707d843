"""Interleaved A/B of our pipeline executor from two source trees, in the time-dilated harness of
pipeline_timedilated.py (stages sleep F/B/W; real tensors over gloo):

    git worktree add /tmp/before HEAD~1
    python bench/pipeline_ab.py /tmp/before . [--schedule dualpipe] [--pp 4] \
        [--microbatches 32] [--pairs 14] [--F 0.02 --B 0.04 --W 0.02] [--json]

Every run is P fresh processes, spawned (not forked from a server that has imported this
package), so each imports megatron_dsv3 from its own tree; the two trees' runs are interleaved
(A, B, B, A, ...): the machine's speed drifts by tens of percent over minutes, and a block of
runs per tree would hand the drift to one of them. Per run: the worst rank's bubble (iteration
time minus its own compute, the harness of this tree for both). Reports each tree's median and
smallest bubble and the median of the paired differences B - A (the estimate to quote: a
difference of a few ms needs ~15 pairs on a 2-core machine).
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(rank, world, root, schedule, N, F, B, W):
    """This rank's bubble in one timed iteration of our `schedule` (the harness's own run, every
    chunk sleeping F/B/W, as in its comparison with the reference), from the tree at `root`."""
    import megatron_dsv3
    if not os.path.abspath(megatron_dsv3.__file__).startswith(root + os.sep):
        raise RuntimeError(f"megatron_dsv3 came from {megatron_dsv3.__file__}, not {root}")
    sys.path.insert(1, HERE)
    import pipeline_timedilated as harness

    wall, compute, _ = harness._run(rank, world, f"ours_{schedule}", F, B, W, N, 1.0)
    return wall - compute


def _bubble(root, a):
    """The worst rank's bubble (s) of one run from the tree at `root`."""
    for name in [m for m in sys.modules if m == "megatron_dsv3" or m.startswith("megatron_dsv3.")]:
        del sys.modules[name]
    sys.path[:] = [root] + [p for p in sys.path if p != root]
    from megatron_dsv3.testing.distributed import run_distributed

    return max(run_distributed(_run, a.pp, args=(root, a.schedule, a.microbatches, a.F, a.B, a.W),
                               megatron_parallel={"pipeline_model_parallel_size": a.pp},
                               timeout=600))


def main():
    sys.path.insert(0, os.path.dirname(HERE))
    from megatron_dsv3.cli import non_negative_float, positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree_a", help="a source tree (checkout) of megatron-dsv3: the baseline")
    p.add_argument("tree_b", help="another source tree: the change")
    p.add_argument("--schedule", choices=["dualpipe", "dualpipev"], default="dualpipe")
    p.add_argument("--pp", type=positive_int, default=4)
    p.add_argument("--microbatches", type=positive_int, default=32)
    p.add_argument("--pairs", type=positive_int, default=14)
    p.add_argument("--F", type=positive_float, default=0.02)
    p.add_argument("--B", type=positive_float, default=0.04)
    p.add_argument("--W", type=non_negative_float, default=0.02)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    roots = []
    for flag, tree in (("tree_a", a.tree_a), ("tree_b", a.tree_b)):
        root = os.path.realpath(tree)
        if not os.path.isfile(os.path.join(root, "megatron_dsv3", "__init__.py")):
            p.error(f"{flag}={tree!r}: no megatron_dsv3/__init__.py there (allowed: a checkout "
                    "of megatron-dsv3, e.g. a git worktree)")
        roots.append(root)
    from pipeline_timedilated import refuse_w_above_b

    refuse_w_above_b(p, a)
    from megatron_dsv3.pipeline.schedules import check

    try:
        check(a.schedule, a.pp, a.microbatches)
    except ValueError as e:
        p.error(f"--schedule/--pp/--microbatches: {e}")
    os.environ["MEGATRON_DSV3_MP_START"] = "spawn"  # each run imports from its own tree
    runs = {0: [], 1: []}
    for i in range(a.pairs):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            runs[side].append(_bubble(roots[side], a) * 1e3)
            print(f"pair {i + 1}/{a.pairs} tree {'AB'[side]}: bubble {runs[side][-1]:.1f} ms",
                  file=sys.stderr, flush=True)
    diffs = [b - x for x, b in zip(runs[0], runs[1])]
    out = {"schedule": a.schedule, "pp": a.pp, "microbatches": a.microbatches, "pairs": a.pairs,
           "tree_a": roots[0], "tree_b": roots[1],
           "a_median_ms": statistics.median(runs[0]), "b_median_ms": statistics.median(runs[1]),
           "a_min_ms": min(runs[0]), "b_min_ms": min(runs[1]),
           "paired_diff_median_ms": statistics.median(diffs),
           "a_runs_ms": runs[0], "b_runs_ms": runs[1]}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{a.schedule}, P = {a.pp}, N = {a.microbatches}, {a.pairs} pairs of runs:")
    for side, name in ((0, "A"), (1, "B")):
        print(f"  tree {name} ({roots[side]}): median bubble {statistics.median(runs[side]):.1f} "
              f"ms, smallest {min(runs[side]):.1f} ms")
    print(f"  median of paired differences B - A: {statistics.median(diffs):+.1f} ms")


if __name__ == "__main__":
    main()
