r"""Simulate a schedule from the same data the executor runs, and draw it.

    python -m megatron_dsv3.pipeline.simulate --schedule dualpipev --pp 4 --microbatches 16 \
        --F 1 --B 2 --W 1 --FB 2.5 [--pairs sequential] [--overhead 0.03 --latency 0.01] \
        [--json] [--plot out.png]

Each rank executes its operation list in order; an operation starts when its rank is free and its
inputs exist (the previous stage's forward of that micro-batch, the next stage's backward).
Durations: F forward chunk, B full backward chunk (input and weight gradients), W weight-gradient
part (a zero-bubble B without it takes B - W), FB an overlapped forward+backward pair; the
command line takes F, B, FB > 0 and 0 <= W <= B (so no operation runs backwards in time). Reported:
per-rank timeline, total time, bubble (idle time of a rank: total time minus its busy time, as in
DeepSeek's table), and peak in-flight activations (forwards whose backward has not run, in units
of one chunk's activations for one micro-batch).

`--pairs sequential` runs each F&B pair as the executor's default pair runner does with the
tagged transfer order, gloo's default (forward half, then backward half; F + B, each half's
output sent when it ends), instead of one overlapped FB with both outputs at its end (the
ordered transfer order, NCCL's default, also sends both after the pair); `--overhead` adds host
time to every forward pass, backward pass and W, `--latency` to every transfer between ranks
(both count as bubble: a model of the time-dilated benchmark, bench/pipeline_timedilated.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Dict, List, Tuple

from megatron_dsv3.cli import check_plot_path, non_negative_float, positive_float, positive_int
from megatron_dsv3.pipeline.schedules import SCHEDULES, Op, build, layout, neighbours


@dataclass
class Times:
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float = 2.5

    def of(self, op: Op) -> float:
        if op.kind == "F":
            return self.F
        if op.kind == "B":
            return self.B - self.W if op.zb else self.B
        return self.W if op.kind == "W" else self.FB


PAIRS = ("overlapped", "sequential")


def simulate(name: str, ranks: int, microbatches: int, times: Times, chunks: int = 2, *,
             pairs: str = "overlapped", overhead: float = 0.0, latency: float = 0.0) -> Dict:
    """`pairs`: how an F&B pair runs. "overlapped" (DeepSeek's accounting): one FB duration,
    both outputs ready at its end. "sequential" (the executor's default pair runner,
    `overlap.sequential_forward_backward`, with the tagged transfer order, gloo's default): the
    forward half (F) then the backward half (B), each output ready when its half ends.
    `overhead`: host time added to every forward pass, backward pass (a pair has one of each)
    and W; `latency`: added to every transfer between two ranks. The bubble counts both (a
    rank's busy time is its compute only), as the time-dilated benchmark measures it."""
    if pairs not in PAIRS:
        raise ValueError(f"pairs={pairs!r} is invalid: allowed values are "
                         f"{', '.join(map(repr, PAIRS))}")
    for field, value in (("overhead", overhead), ("latency", latency)):
        if not value >= 0:
            raise ValueError(f"{field}={value!r} is invalid: allowed values are numbers >= 0")
    ops = build(name, ranks, microbatches, chunks, times)
    lay = layout(name, ranks, chunks)
    done: Dict[Tuple[str, int, int], float] = {}  # (F|B, stage key, mb) -> finish time
    clock = [0.0] * ranks
    pos = [0] * ranks
    timeline: List[List[Dict]] = [[] for _ in range(ranks)]

    def key(rank, chunk):
        return (lay.stage(rank, chunk), chunk if lay.name == "dualpipe" else 0)

    def arrival(kind, peer, rank, mb):
        end = done.get((kind, key(*peer), mb))
        return None if end is None else end + (latency if peer[0] != rank else 0.0)

    def ready(rank, kind, chunk, mb):
        prev, nxt = neighbours(lay, rank, chunk)
        if kind == "F":
            return 0.0 if prev is None else arrival("F", prev, rank, mb)
        own = done.get(("F", key(rank, chunk), mb))
        if own is None:
            return None
        if nxt is None:
            return own
        down = arrival("B", nxt, rank, mb)
        return None if down is None else max(own, down)

    def duration(kind, zb):
        return times.F if kind == "F" else (times.B - times.W if zb else times.B)

    remaining = sum(len(o) for o in ops)
    while remaining:
        progressed = False
        for r in range(ranks):
            if pos[r] >= len(ops[r]):
                continue
            op = ops[r][pos[r]]
            halves = [("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2)] if op.kind == "FB" \
                else [(op.kind, op.chunk, op.mb)]
            if op.kind == "W":
                start = clock[r]
                end, compute = start + times.W + overhead, times.W
            else:
                deps = [ready(r, k, c, m) for k, c, m in halves]
                if any(d is None for d in deps):
                    continue
                if op.kind == "FB" and pairs == "sequential":
                    start = end = max(clock[r], deps[0])
                    compute = 0.0
                    for (k, c, m), dep in zip(halves, deps):
                        end = max(end, dep) + duration(k, False) + overhead
                        compute += duration(k, False)
                        done[(k, key(r, c), m)] = end
                else:
                    start = max([clock[r]] + deps)
                    compute = times.of(op)
                    end = start + compute + overhead * len(halves)
                    for k, c, m in halves:
                        done[(k, key(r, c), m)] = end
            timeline[r].append({"op": str(op), "kind": op.kind, "chunk": op.chunk, "mb": op.mb,
                                "chunk2": op.chunk2, "mb2": op.mb2, "zb": op.zb,
                                "start": start, "end": end, "compute": compute})
            clock[r] = end
            pos[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name} deadlocks at positions {pos}")
    total = max(clock)
    busy = [sum(e["compute"] for e in t) for t in timeline]
    peak = []
    for t in timeline:
        live, best = 0, 0
        for e in t:  # forwards add a micro-batch's activations, backwards release them
            if e["kind"] in ("F", "FB"):
                live += 1
                best = max(best, live)
            if e["kind"] in ("B", "FB"):
                live -= 1
        peak.append(best)
    return {"schedule": name, "ranks": ranks, "microbatches": microbatches,
            "times": vars(times), "pairs": pairs, "overhead": overhead, "latency": latency,
            "total": total, "bubble_per_rank": [total - b for b in busy],
            "bubble": max(total - b for b in busy), "busy_per_rank": busy,
            "peak_activations_per_rank": peak, "peak_activations": max(peak),
            "timeline": timeline}


def expected_bubble(name: str, ranks: int, t: Times) -> float:
    """DeepSeek's table; `ranks` = devices (for DualPipeV, PP/2 = devices). For DualPipe(V) the
    closed forms are exact when W = F and B = 2F (the table's accounting); with other durations
    the simulated schedule is the reference."""
    if name == "1f1b":
        return (ranks - 1) * (t.F + t.B)
    if name == "zb1p":
        return (ranks - 1) * (t.F + t.B - 2 * t.W)
    if name == "dualpipe":
        return (ranks / 2 - 1) * (t.FB + t.B - 3 * t.W)
    if name == "dualpipev":
        return (ranks - 1) * (t.FB + t.B - 3 * t.W)
    raise ValueError(f"no closed form for {name}")


def plot(result: Dict, path: str) -> None:
    """One row per rank, one colour per micro-batch; F solid, B hatched, W light, FB split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    timeline = result["timeline"]
    n = result["microbatches"]
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(max(8, result["total"] * 0.35), 0.6 * len(timeline) + 1.2))

    def box(y, x0, x1, mb, kind, chunk, height=0.8):
        color = cmap(mb % cmap.N)
        style = {"F": dict(alpha=1.0, hatch=None), "B": dict(alpha=0.75, hatch="///"),
                 "W": dict(alpha=0.35, hatch="..")}[kind]
        ax.barh(y, x1 - x0, left=x0, height=height, color=color, alpha=style["alpha"],
                hatch=style["hatch"], edgecolor="k", linewidth=0.4)
        ax.text((x0 + x1) / 2, y, f"{kind}{mb}" + ("'" if chunk == 1 else ""), ha="center",
                va="center", fontsize=6)

    for r, events in enumerate(timeline):
        for e in events:
            if e["kind"] == "FB":  # upper half: the forward, lower half: the backward
                box(r - 0.2, e["start"], e["end"], e["mb"], "F", e["chunk"], 0.4)
                box(r + 0.2, e["start"], e["end"], e["mb2"], "B", e["chunk2"], 0.4)
            else:
                box(r, e["start"], e["end"], e["mb"], e["kind"], e["chunk"])
    ax.set_yticks(range(len(timeline)), [f"rank {r}" for r in range(len(timeline))])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"{result['schedule']}: {len(timeline)} ranks, {n} micro-batches, total "
                 f"{result['total']:g}, bubble {result['bubble']:g}, peak activations "
                 f"{result['peak_activations']}")
    ax.legend(handles=[Patch(facecolor="grey", label="F forward"),
                       Patch(facecolor="grey", alpha=0.75, hatch="///", label="B backward"),
                       Patch(facecolor="grey", alpha=0.35, hatch="..", label="W weight grad"),
                       Patch(facecolor="white", edgecolor="k", label="F&B pair: split row; ' = chunk 1")],
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_dsv3.pipeline.simulate",
                                description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--schedule", required=True, choices=SCHEDULES)
    p.add_argument("--pp", type=positive_int, required=True,
                   help="pipeline ranks (devices), integer >= 1")
    p.add_argument("--microbatches", type=positive_int, required=True,
                   help="micro-batches per step, integer >= 1 (schedules add their own rules)")
    p.add_argument("--chunks", type=positive_int, default=None,
                   help="model chunks per rank, integer >= 1 (interleaved only; default 2)")
    p.add_argument("--F", type=positive_float, default=1.0,
                   help="forward chunk time, > 0 (default 1)")
    p.add_argument("--B", type=positive_float, default=2.0,
                   help="full backward chunk time, > 0 (default 2)")
    p.add_argument("--W", type=non_negative_float, default=1.0,
                   help="weight-gradient part of B, in [0, B] (default 1; 0 = none deferred)")
    p.add_argument("--FB", type=positive_float, default=2.5,
                   help="overlapped forward+backward pair time, > 0 (default 2.5)")
    p.add_argument("--pairs", choices=PAIRS, default="overlapped",
                   help="F&B pairs: overlapped (one FB time, both outputs at its end; default) or "
                        "sequential (F then B, each output when its half ends: the executor "
                        "on gloo's tagged transfer order)")
    p.add_argument("--overhead", type=non_negative_float, default=0.0,
                   help="host time per forward pass, backward pass and W, >= 0 (default 0)")
    p.add_argument("--latency", type=non_negative_float, default=0.0,
                   help="time per transfer between two ranks, >= 0 (default 0)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write the timeline to this image file "
                   "(.png, .pdf, .svg, .jpg)")
    a = p.parse_args(argv)
    if a.chunks is not None and a.schedule != "interleaved":
        p.error(f"--chunks applies to --schedule interleaved only (allowed: leave it out with "
                f"--schedule {a.schedule}, whose chunks per rank are fixed)")
    try:
        if a.plot is not None:
            check_plot_path("--plot", a.plot)
    except ValueError as e:
        p.error(str(e))
    if a.W > a.B:  # a zero-bubble backward without W takes B - W: it would run backwards in time
        p.error(f"argument --W: {a.W:g} is invalid: allowed values are numbers in [0, --B] = "
                f"[0, {a.B:g}] (W is the weight-gradient part of the backward B)")
    try:
        res = simulate(a.schedule, a.pp, a.microbatches, Times(a.F, a.B, a.W, a.FB),
                       2 if a.chunks is None else a.chunks, pairs=a.pairs,
                       overhead=a.overhead, latency=a.latency)
    except ValueError as e:
        p.error(str(e))
    if a.plot:
        plot(res, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    if a.json:
        print(json.dumps(res))
        return
    for r, events in enumerate(res["timeline"]):
        print(f"rank {r}: " + " ".join(f"{e['op']}@{e['start']:g}" for e in events))
    print(f"total {res['total']:g}  bubble {res['bubble']:g} (per rank "
          f"{[round(b, 3) for b in res['bubble_per_rank']]})  peak activations "
          f"{res['peak_activations']} (per rank {res['peak_activations_per_rank']})")


if __name__ == "__main__":
    sys.exit(main())
