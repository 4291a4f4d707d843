"""DualPipe's overlapped forward & backward pair, for real: the pair's forward runs in a second
thread while its backward runs in the calling thread, so one micro-batch's MoE dispatch and
combine are in flight while the other micro-batch computes.

A pair runner is `runner(run_forward, run_backward)`; the executor takes one as `overlap=`:

    from megatron_dsv3.pipeline import forward_backward_dualpipev
    from megatron_dsv3.pipeline.overlap import threaded_forward_backward
    forward_backward_dualpipev(..., overlap=threaded_forward_backward)

(default: `sequential_forward_backward`, one half after the other).

Why this is safe:
- Collectives. Forward passes issue their all-to-alls on lane 0 of the dispatcher's process
  groups, backward passes (autograd and recompute) on lane 1 (megatron_dsv3.lanes; the executor
  sets each pass's lane). On each lane the order of collectives is the order of the rank's F (or
  B) operations, which every expert-parallel rank shares, so the two threads never cross their
  transfers.
- Arithmetic. The forward reads parameters; the backward writes gradients; no tensor is written by
  both. Each pass computes exactly what it computes alone, so the results are bitwise those of the
  sequential pair (tests/pipeline/test_overlap.py).
- Thread state. Grad mode is thread-local: the executor sets it inside each pass. Autograd runs
  CPU backward work on the thread that calls it.
- CPU only. On CUDA both threads would wait on the one default stream, which ties each lane's
  collectives to the other lane's and can deadlock expert-parallel ranks that interleave them
  differently: the executor refuses `threaded_forward_backward` there (docs/backends.md).

Pipeline point-to-point transfers stay tagged by (kind, stage, direction, micro-batch), so both
threads may send and receive at once. A step's timeline (`megatron_dsv3.lanes.StepTrace`, passed
to the executor as `trace=`) is drawn by `plot_overlap_timeline`.
"""

from __future__ import annotations

from typing import Callable, Dict

from megatron_dsv3.lanes import run_on_two_lanes


def sequential_forward_backward(run_forward: Callable[[], None],
                                run_backward: Callable[[], None]) -> None:
    """The pair one half after the other, in the calling thread (the executor's default)."""
    run_forward()
    run_backward()


def threaded_forward_backward(run_forward: Callable[[], None],
                              run_backward: Callable[[], None]) -> None:
    """Run `run_forward` in a helper thread and `run_backward` here, together. An exception in
    either is raised here after both have finished."""
    run_on_two_lanes(run_forward, run_backward, name="dsv3-pair-forward")


def plot_overlap_timeline(trace: Dict, path: str, title: str = "",
                          lanes=("forward ops (lane 0)", "backward ops (lane 1)")) -> None:
    """Rows: lane 0 (forward passes) and lane 1 (backward passes), each with its operations and,
    below, its all-to-all transfers in flight (inter-node and intra-node stages coloured apart).
    `lanes` names the two operation rows (decoding: the two micro-batches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"F": "#4c72b0", "B": "#dd8452", "attn": "#4c72b0", "dispatch_inter": "#2ca02c",
               "dispatch_intra": "#98df8a", "combine_intra": "#c5b0d5", "combine_inter": "#9467bd"}
    rows = {("op", 0): 3, ("a2a", 0): 2, ("op", 1): 1, ("a2a", 1): 0}
    fig, ax = plt.subplots(figsize=(12, 3.2))
    for o in trace["ops"]:
        y = rows[("op", o["lane"])]
        ax.barh(y, o["end"] - o["start"], left=o["start"], height=0.8,
                color=colours.get(o["kind"], "grey"),
                edgecolor="black" if o["pair"] else "none", linewidth=0.6)
        ax.text((o["start"] + o["end"]) / 2, y, f"{o['kind']}{o['chunk']}.{o['mb']}",
                ha="center", va="center", fontsize=6, color="white")
    for t in trace["transfers"]:
        y = rows[("a2a", t.get("lane", 0))]
        ax.barh(y, max(t["end"] - t["start"], 1e-4), left=t["start"], height=0.6,
                color=colours.get(t["stage"], "grey"), alpha=0.8)
    ax.set_yticks([3, 2, 1, 0])
    ax.set_yticklabels([lanes[0], "lane 0 all-to-alls", lanes[1], "lane 1 all-to-alls"])
    ax.set_xlabel("seconds in the step")
    present = {o["kind"] for o in trace["ops"]} | {t["stage"] for t in trace["transfers"]}
    shown = {k: c for k, c in colours.items() if k in present}
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in shown.values()]
    ax.legend(handles, list(shown), fontsize=7, ncol=6, loc="upper center",
              bbox_to_anchor=(0.5, -0.25))
    ax.set_title(title or f"overlapped F&B pairs (outlined); transfers of one lane in flight while "
                 f"the other computes: {trace['overlap_seconds']:.3f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
