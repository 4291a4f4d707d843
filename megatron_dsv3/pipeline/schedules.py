"""Pipeline schedules as data: each rank's ordered list of operations.

Operations: F (forward of one chunk on one micro-batch), B (full backward; with `zb` only the
input gradient, the weight gradient deferred), W (the oldest deferred weight gradient), FB (a
forward and a backward of different chunks run as an overlapped pair), and the point-to-point
SEND/RECV of activations and gradients between stages (`with_comm`).

DualPipeV (DeepSeek): P ranks hold 2P stages in a V; rank r holds stage r (chunk 0) and stage
2P-1-r (chunk 1); micro-batches enter and leave at rank 0. DualPipe: P ranks (P even) hold the
P stages twice, mirrored: rank r holds stage r of direction 0 (chunk 0) and stage P-1-r of
direction 1 (chunk 1); half of the micro-batches enter at each end. Both follow the same eight
phases per rank, counted from h (the rank's distance from the outer end of its half) and Ph (the
ranks in a half): nF0 (Ph-h-1)*2, nF0F1 h+1, nB1W1F1 Ph-h-1, main F0B1F1B0 n-2Ph+h+1,
nB1F1B0 Ph-h-1, nB1B0 h+1, nWB0 Ph-h-1, nW h+1 (n micro-batches per direction).
Megatron's 1F1B, its interleaved variant and ZB-H1 (zb1p) are generated here too, for the
simulator and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

SCHEDULES = ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Op:
    kind: str  # "F", "B", "W", "FB", "SEND_F", "RECV_F", "SEND_B", "RECV_B"
    chunk: int = -1
    mb: int = -1
    zb: bool = False  # B only: defer the weight gradient to a later W
    chunk2: int = -1  # FB only: the backward half
    mb2: int = -1
    peer: int = -1  # SEND/RECV only: the other rank

    def __str__(self):
        if self.kind == "FB":
            return f"F{self.chunk}.{self.mb}&B{self.chunk2}.{self.mb2}"
        if self.kind in ("F", "B"):
            return f"{self.kind}{self.chunk}.{self.mb}{'z' if self.zb else ''}"
        if self.kind == "W":
            return f"W{self.chunk}.{self.mb}"
        return f"{self.kind}{self.chunk}.{self.mb}@{self.peer}"


@dataclass(frozen=True)
class Layout:
    """Where stages live: stage_of[(rank, chunk)] and rank/chunk of each stage per direction."""

    name: str
    ranks: int
    chunks: int  # model chunks per rank
    stages: int  # stages a micro-batch traverses
    directions: int = 1

    def stage(self, rank: int, chunk: int) -> int:
        if self.name == "dualpipev":
            return rank if chunk == 0 else 2 * self.ranks - 1 - rank
        if self.name == "dualpipe":
            return rank if chunk == 0 else self.ranks - 1 - rank
        if self.name == "interleaved":
            return chunk * self.ranks + rank
        return rank

    def place(self, stage: int, chunk: int = 0) -> Tuple[int, int]:
        """(rank, chunk) holding `stage`; for DualPipe, `chunk` names the direction."""
        if self.name == "dualpipev":
            return (stage, 0) if stage < self.ranks else (2 * self.ranks - 1 - stage, 1)
        if self.name == "dualpipe":
            return (stage, 0) if chunk == 0 else (self.ranks - 1 - stage, 1)
        if self.name == "interleaved":
            return stage % self.ranks, stage // self.ranks
        return stage, 0


def layout(name: str, ranks: int, chunks: int = 2) -> Layout:
    if name == "dualpipev":
        return Layout(name, ranks, 2, 2 * ranks)
    if name == "dualpipe":
        return Layout(name, ranks, 2, ranks, directions=2)
    if name == "interleaved":
        return Layout(name, ranks, chunks, chunks * ranks)
    return Layout(name, ranks, 1, ranks)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_ranks(name: str, ranks: int, chunks: int = 2, *,
                ranks_name: str = "pipeline ranks") -> None:
    """ValueError naming the setting (`ranks_name`: how the caller spells the rank count) and
    its allowed values for a layout the schedule cannot place; needs no micro-batch count, so
    the model chunks' builder asks it too."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown: allowed values are {', '.join(SCHEDULES)}")
    if not _count(ranks):
        raise ValueError(f"{ranks_name}={ranks!r} is invalid: allowed values are integers >= 1")
    if not _count(chunks):
        raise ValueError(f"chunks={chunks!r} is invalid: allowed values are integers >= 1 (model "
                         "chunks per rank)")
    if name == "dualpipe" and ranks % 2:
        raise ValueError(f"DualPipe needs an even number of pipeline ranks (stages): "
                         f"{ranks_name}={ranks} is invalid; allowed values are 2, 4, 6, ...")


def check(name: str, ranks: int, microbatches: int, chunks: int = 2) -> None:
    """ValueError naming the setting and its allowed values for a schedule that cannot run."""
    check_ranks(name, ranks, chunks)
    if not _count(microbatches):
        raise ValueError(f"micro-batches={microbatches!r} is invalid: allowed values are "
                         "integers >= 1")
    if name == "dualpipe":
        if microbatches % 2 or microbatches < 2 * ranks:
            raise ValueError(f"DualPipe needs an even number of micro-batches >= 2 x ranks = "
                             f"{2 * ranks}; got {microbatches}")
    if name == "dualpipev" and microbatches < 2 * ranks:
        raise ValueError(f"DualPipeV needs micro-batches >= 2 x ranks = {2 * ranks}; got "
                         f"{microbatches}")
    if name == "interleaved" and microbatches % ranks:
        raise ValueError(f"the interleaved schedule needs micro-batches divisible by the "
                         f"{ranks} ranks; got {microbatches}")


def _dual(name: str, rank: int, ranks: int, microbatches: int) -> List[Op]:
    """The eight DualPipe phases of one rank, in terms of its near (0) and far (1) chunks, with
    the point-to-point transfers where DeepSeek's DualPipe places them (`ordered_plan`):
    RECV_*/SEND_* ops name (chunk, micro-batch) and are resolved to peers (or dropped, at the
    ends and for same-rank hand-offs) by `ordered_plan`; `build` keeps the compute ops."""
    if name == "dualpipev":
        half_ranks, h, n, flip = ranks, rank, microbatches, False
    else:
        half_ranks, h, n, flip = ranks // 2, min(rank, ranks - 1 - rank), microbatches // 2, \
            rank >= ranks // 2
    middle = h == half_ranks - 1
    chunk = (lambda p: p ^ 1) if flip else (lambda p: p)
    nf, nb = [0, 0], [0, 0]
    # transfers counted apart from compute: the k-th receive (send) of a kind and chunk carries
    # micro-batch k, whenever the schedule posts (issues) it
    counts = {kind: [0, 0] for kind in ("RECV_F", "SEND_F", "RECV_B", "SEND_B")}
    deferred: List[Tuple[int, int]] = []
    ops: List[Op] = []

    def comm(kind, p):
        ops.append(Op(kind, chunk(p), counts[kind][p]))
        counts[kind][p] += 1

    def F(p, recv=True, send=True):
        if recv:
            comm("RECV_F", p)
        ops.append(Op("F", chunk(p), nf[p]))
        nf[p] += 1
        if send:
            comm("SEND_F", p)

    def B(p, zb=False, recv=True, send=True):
        if recv:
            comm("RECV_B", p)
        ops.append(Op("B", chunk(p), nb[p], zb=zb))
        if zb:
            deferred.append((chunk(p), nb[p]))
        nb[p] += 1
        if send:
            comm("SEND_B", p)

    def W():
        c, m = deferred.pop(0)
        ops.append(Op("W", c, m))

    def FB(pf, pb, recv_f=True):
        if recv_f:
            comm("RECV_F", pf)
        comm("RECV_B", pb)
        ops.append(Op("FB", chunk(pf), nf[pf], chunk2=chunk(pb), mb2=nb[pb]))
        nf[pf] += 1
        nb[pb] += 1
        comm("SEND_F", pf)
        comm("SEND_B", pb)

    for _ in range((half_ranks - h - 1) * 2):
        F(0)
    # the receive of each next near-chunk forward is posted one operation early; the middle
    # rank sends its near forward at once, the others after the far forward
    comm("RECV_F", 0)
    for i in range(h + 1):
        F(0, recv=False, send=middle)
        comm("RECV_F", 0)
        F(1, send=not middle or i < h)
        if not middle:
            comm("SEND_F", 0)
    for _ in range(half_ranks - h - 1):
        B(1, zb=True)
        comm("RECV_F", 1)  # posted with the pending send, before the W
        W()
        F(1, recv=False)
    for i in range(n - 2 * half_ranks + h + 1):
        if i == 0 and middle:  # the bottom of the V: not overlapped, to shrink the bubble
            F(0, recv=False, send=False)
            comm("SEND_F", 1)  # the far forward held back in the previous phase
            B(1, send=False)
            comm("SEND_F", 0)
            comm("SEND_B", 1)
        else:
            FB(0, 1, recv_f=i > 0)
        FB(1, 0)
    for _ in range(half_ranks - h - 1):
        B(1)
        FB(1, 0)
    zb = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        B(1, zb=zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        B(0, zb=zb)
    for _ in range(half_ranks - h - 1):
        W()
        B(0, zb=True)
    for _ in range(h + 1):
        W()
    assert not deferred and nf == [n, n] and nb == [n, n]
    assert all(c == [n, n] for c in counts.values())
    return ops


COMPUTE = ("F", "B", "W", "FB")


def ordered_plan(name: str, ranks: int, microbatches: int,
                 forward_only: bool = False) -> List[List[Op]]:
    """Every rank's operations with its point-to-point transfers in DeepSeek's DualPipe order:
    each compute op is preceded by one batch of the transfers listed since the previous one
    (pending sends and the receives posted for this or a later op), issued together.

    Backends that match messages by order and run them on FIFO streams (NCCL) need this: the
    k-th send from a rank to a peer meets the peer's k-th receive from that rank, and a batch
    that waits for a peer never stands in front of the send that peer waits for
    (megatron_dsv3.testing.nccl_p2p checks both for every rank). RECV_*/SEND_* ops carry the
    peer's pipeline rank; transfers at the ends of the pipeline and between a rank's own two
    chunks (DualPipeV's bottom) are not listed. `forward_only`: the backward ops and their
    transfers are left out, the forwards keep their places."""
    if name not in ("dualpipe", "dualpipev"):
        raise ValueError(f"ordered_plan: schedule={name!r}: allowed values are dualpipe, "
                         f"dualpipev")
    check(name, ranks, microbatches)
    lay = layout(name, ranks)
    plans = []
    for rank in range(ranks):
        plan = []
        for op in _dual(name, rank, ranks, microbatches):
            if op.kind in COMPUTE:
                if forward_only:
                    if op.kind == "FB":
                        op = Op("F", op.chunk, op.mb)
                    elif op.kind != "F":
                        continue
                plan.append(op)
                continue
            if forward_only and op.kind.endswith("B"):
                continue
            peer = transfer_peer(lay, rank, op.kind, op.chunk)
            if peer is not None:
                plan.append(Op(op.kind, op.chunk, op.mb, peer=peer))
        plans.append(plan)
    return plans


def _one_f_one_b(rank: int, ranks: int, n: int) -> List[Op]:
    warmup = min(ranks - rank - 1, n)
    ops = [Op("F", 0, i) for i in range(warmup)]
    for i in range(n - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    return ops + [Op("B", 0, i) for i in range(n - warmup, n)]


def _zb1p(ranks: int, n: int, times) -> List[List[Op]]:
    """ZB-H1: 1F1B's order with every backward split (input gradient now, weight gradient
    deferred); each deferred W runs where its rank would otherwise wait, at most `ranks - rank`
    outstanding (activation memory stays within 1F1B's), the rest at the end. The gaps depend on
    the op durations, so this list is built by playing the schedule forward with `times`."""
    base = [[Op(o.kind, o.chunk, o.mb, zb=o.kind == "B") for o in _one_f_one_b(r, ranks, n)]
            for r in range(ranks)]
    out: List[List[Op]] = [[] for _ in range(ranks)]
    clock = [0.0] * ranks
    pos = [0] * ranks
    queue: List[List[int]] = [[] for _ in range(ranks)]
    done: Dict[Tuple[str, int, int], float] = {}

    def ready(r, op):
        if op.kind == "F":
            return 0.0 if r == 0 else done.get(("F", r - 1, op.mb))
        own = done.get(("F", r, op.mb))
        if own is None or r == ranks - 1:
            return own
        down = done.get(("B", r + 1, op.mb))
        return None if down is None else max(own, down)

    def run(r, op, start):
        end = start + times.of(op)
        if op.kind in ("F", "B"):
            done[(op.kind, r, op.mb)] = end
        out[r].append(op)
        clock[r] = end

    while any(pos[r] < len(base[r]) for r in range(ranks)):
        progressed = False
        for r in range(ranks):
            if pos[r] >= len(base[r]):
                continue
            op = base[r][pos[r]]
            t = ready(r, op)
            if queue[r] and (t is None or t > clock[r] or len(queue[r]) >= r + 1):
                run(r, Op("W", 0, queue[r].pop(0)), clock[r])  # fill the wait with a W
                progressed = True
                continue
            if t is None:
                continue
            run(r, op, max(clock[r], t))
            if op.kind == "B":
                queue[r].append(op.mb)
            pos[r] += 1
            progressed = True
        if not progressed:  # every rank waits on a rank that waits: cannot happen for 1F1B
            raise RuntimeError("zb1p construction deadlocked")
    for r in range(ranks):
        out[r] += [Op("W", 0, m) for m in queue[r]]
    return out


def _interleaved(rank: int, ranks: int, n: int, v: int) -> List[Op]:
    """Megatron's interleaved 1F1B with v chunks per rank (micro-batches in groups of `ranks`)."""
    total = n * v
    warmup = min((ranks - rank - 1) * 2 + (v - 1) * ranks, total)

    def fwd(k):
        return Op("F", (k // ranks) % v, (k // (ranks * v)) * ranks + k % ranks)

    def bwd(k):
        return Op("B", v - 1 - (k // ranks) % v, (k // (ranks * v)) * ranks + k % ranks)

    ops = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [fwd(warmup + k), bwd(k)]
    ops += [bwd(k) for k in range(total - warmup, total)]
    return ops


def build(name: str, ranks: int, microbatches: int, chunks: int = 2,
          times=None) -> List[List[Op]]:
    """Every rank's compute operations, in execution order (`times`: op durations, used by
    zb1p, whose W placement depends on them; default F=1, B=2, W=1)."""
    check(name, ranks, microbatches, chunks)
    if name in ("dualpipe", "dualpipev"):
        return [[op for op in _dual(name, r, ranks, microbatches) if op.kind in COMPUTE]
                for r in range(ranks)]
    if name == "interleaved":
        return [_interleaved(r, ranks, microbatches, chunks) for r in range(ranks)]
    if name == "zb1p":
        from megatron_dsv3.pipeline.simulate import Times

        return _zb1p(ranks, microbatches, times or Times())
    return [_one_f_one_b(r, ranks, microbatches) for r in range(ranks)]


def neighbours(lay: Layout, rank: int, chunk: int) -> Tuple[Optional[Tuple[int, int]],
                                                            Optional[Tuple[int, int]]]:
    """((rank, chunk) of the previous stage, of the next stage) of this rank's chunk; None at
    the ends of the pipeline."""
    stage = lay.stage(rank, chunk)
    direction = chunk if lay.name == "dualpipe" else 0
    prev = lay.place(stage - 1, direction) if stage > 0 else None
    nxt = lay.place(stage + 1, direction) if stage < lay.stages - 1 else None
    return prev, nxt


def transfer_peer(lay: Layout, rank: int, transfer: str, chunk: int) -> Optional[int]:
    """The other rank of `transfer` ("RECV_F", "RECV_B", "SEND_F", "SEND_B") of this rank's
    `chunk`: a forward's input comes from the previous stage and its output goes to the next, a
    backward's the other way. None at the ends of the pipeline and between a rank's own chunks."""
    prev, nxt = neighbours(lay, rank, chunk)
    receive, forward = transfer.startswith("RECV"), transfer.endswith("F")
    peer = prev if receive == forward else nxt
    return None if peer is None or peer[0] == rank else peer[0]


def with_comm(lay: Layout, rank: int, ops: List[Op]) -> List[Op]:
    """Insert the point-to-point operations: RECV before a compute op that needs an input from
    another rank, SEND after one whose output another rank needs (same-rank hand-offs, like
    the bottom of the V, need none)."""
    out: List[Op] = []
    for op in ops:
        halves = ([("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2)] if op.kind == "FB"
                  else [(op.kind, op.chunk, op.mb)])
        pre, post = [], []
        for kind, c, m in halves:
            if kind not in ("F", "B"):
                continue
            src = transfer_peer(lay, rank, "RECV_" + kind, c)
            dst = transfer_peer(lay, rank, "SEND_" + kind, c)
            if src is not None:
                pre.append(Op("RECV_" + kind, c, m, peer=src))
            if dst is not None:
                post.append(Op("SEND_" + kind, c, m, peer=dst))
        out += pre + [op] + post
    return out


def summary(ops: List[List[Op]]) -> Dict[str, int]:
    return {k: sum(1 for r in ops for o in r if o.kind == k) for k in ("F", "B", "W", "FB")}
