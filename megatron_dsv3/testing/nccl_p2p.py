"""NCCL's point-to-point rules on paper: would this order of transfers hang, or hand a rank the
wrong tensor, on a GPU cluster? Checked here, on CPU, without NCCL.

What NCCL does, and what this model keeps of it:
- Matching by order. NCCL has no tags: the k-th send from rank a to rank b meets the k-th receive
  that b posts from a. A program whose orders differ gets another micro-batch's tensor of the
  same shape, silently ("crossed" below).
- FIFO streams. torch's ProcessGroupNCCL runs the transfers between two ranks on one stream per
  communicator (`streams="pair"`: one per pair of ranks, a group with two peers standing in
  both; `streams="rank"`: one for all of a rank's transfers, stricter). A transfer occupies its
  stream until it is done: a receive until the matching send has started, a send until the
  matching receive has started (sends of activations are far above NCCL's eager threshold, so
  they wait for their receiver).
- Groups. A batch (`torch.distributed.batch_isend_irecv`, one NCCL group) starts as one unit and
  its transfers progress together; it is done when all of them are.
- Streams meet compute. A batch waits for everything its rank put on the compute stream
  before it, waits included (ProcessGroupNCCL makes its stream wait for the current stream);
  waiting for a received tensor puts a wait for the transfer's batch on the compute stream.
  Compute blocks the host until it is done: a MoE layer reads its token counts on the host, so
  the host cannot issue later transfers early.

A program is one rank's list of events in the host's order:
    ("batch", [("send" | "recv", peer, message[, communicator]), ...])   one group of transfers
                           (a collective is a group with every member; communicators apart
                           have their own streams and their own order)
    ("wait", message)      the next compute waits for the batch that received `message`
    ("compute", label)
`message` names what travels (the receiver names it as the sender does). At the end every send is
waited for. `check(programs)` -> Report(deadlock, stuck, crossed).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass
class Report:
    deadlock: bool
    stuck: List[str] = field(default_factory=list)  # what each blocked rank / stream waits on
    crossed: List[Tuple[int, int, object, object]] = field(default_factory=list)
    # (sender, receiver, message sent, message the receive expected)

    @property
    def ok(self) -> bool:
        return not self.deadlock and not self.crossed


class _Transfer:
    __slots__ = ("rank", "peer", "send", "message", "index", "batch", "comm")

    def __init__(self, rank, peer, send, message, index, batch, comm):
        self.rank, self.peer, self.send, self.message = rank, peer, send, message
        self.index, self.batch, self.comm = index, batch, comm


class _Batch:
    __slots__ = ("rank", "after", "transfers", "streams", "started", "done")

    def __init__(self, rank, after):
        self.rank, self.after = rank, after  # compute-stream items issued before the batch
        self.transfers: List[_Transfer] = []
        self.streams: List[tuple] = []
        self.started = self.done = False


def check(programs: List[List[tuple]], streams: str = "pair") -> Report:
    if streams not in ("pair", "rank"):
        raise ValueError(f"streams={streams!r}: allowed values are 'pair', 'rank'")
    ranks = len(programs)
    pc = [0] * ranks
    queued = [0] * ranks  # compute-stream items (compute and waits) issued per rank
    passed = [0] * ranks  # ... and passed
    compute_queue = [deque() for _ in range(ranks)]  # ("compute",) or ("wait", batch)
    queues: Dict[tuple, deque] = defaultdict(deque)  # stream -> batches
    # (src, dst, communicator) -> transfers in issue order
    sends: Dict[Tuple[int, int, object], List[_Transfer]] = defaultdict(list)
    recvs: Dict[Tuple[int, int, object], List[_Transfer]] = defaultdict(list)
    received: List[Dict[object, _Batch]] = [{} for _ in range(ranks)]
    my_sends: List[List[_Batch]] = [[] for _ in range(ranks)]
    blocked = [False] * ranks  # the host waits for its last compute op
    crossed = []

    def stream_keys(rank, batch):
        if streams == "rank":
            return sorted({(rank, t.comm) for t in batch.transfers}, key=str)
        return sorted({(rank, t.peer, t.comm) for t in batch.transfers}, key=str)

    def issue(rank, event) -> None:
        kind = event[0]
        if kind == "batch":
            batch = _Batch(rank, queued[rank])
            for what, peer, message, *comm in event[1]:
                comm = comm[0] if comm else 0
                key = (rank, peer, comm) if what == "send" else (peer, rank, comm)
                seq = sends[key] if what == "send" else recvs[key]
                t = _Transfer(rank, peer, what == "send", message, len(seq), batch, comm)
                seq.append(t)
                batch.transfers.append(t)
                if what == "recv":
                    received[rank][message] = batch
                else:
                    my_sends[rank].append(batch)
            batch.streams = stream_keys(rank, batch)
            for key in batch.streams:  # a group spanning peers stands in each pair's stream
                queues[key].append(batch)
        elif kind == "wait":
            compute_queue[rank].append(("wait", received[rank][event[1]]))
            queued[rank] += 1
        elif kind == "compute":
            compute_queue[rank].append(("compute",))
            queued[rank] += 1
            blocked[rank] = True
        else:
            raise ValueError(f"unknown event {event!r}")

    def partner(t: _Transfer):
        seq = recvs[(t.rank, t.peer, t.comm)] if t.send else sends[(t.peer, t.rank, t.comm)]
        return seq[t.index] if t.index < len(seq) else None

    progress = True
    while progress:
        progress = False
        for r in range(ranks):
            while True:
                if blocked[r]:  # (nothing is queued after the compute it waits for)
                    if compute_queue[r]:
                        break
                    blocked[r] = False
                if pc[r] == len(programs[r]):
                    if my_sends[r] is not None:  # the end: the rank waits for all its sends
                        for b in my_sends[r]:
                            compute_queue[r].append(("wait", b))
                            queued[r] += 1
                        my_sends[r] = None
                        progress = True
                    break
                issue(r, programs[r][pc[r]])
                pc[r] += 1
                progress = True
            while compute_queue[r]:
                head = compute_queue[r][0]
                if head[0] == "wait" and not head[1].done:
                    break
                compute_queue[r].popleft()
                passed[r] += 1
                progress = True
        for q in queues.values():
            head = q[0] if q else None
            if head is not None and not head.started and passed[head.rank] >= head.after \
                    and all(queues[k][0] is head for k in head.streams):
                head.started = progress = True
        for q in queues.values():
            head = q[0] if q else None
            if head is None or not head.started or head.done:
                continue
            finished = True
            for t in head.transfers:
                other = partner(t)
                if other is None or not other.batch.started:
                    finished = False
                elif t.send and other.message != t.message:
                    crossed.append((t.rank, t.peer, t.message, other.message))
            if finished:
                head.done = progress = True
                for k in head.streams:
                    queues[k].popleft()
    stuck = []
    for r in range(ranks):
        if pc[r] < len(programs[r]) or compute_queue[r]:
            stuck.append(f"rank {r}: host at event {pc[r]} of {len(programs[r])}, compute "
                         f"waits on {len(compute_queue[r])} item(s)")
    for key, q in queues.items():
        if q:
            head = q[0]
            stuck.append(f"stream {key}: head batch of rank {head.rank} "
                         f"{'started' if head.started else 'not started'}: "
                         + ", ".join(f"{'send' if t.send else 'recv'} {t.message} "
                                     f"{'to' if t.send else 'from'} {t.peer}"
                                     for t in head.transfers))
    return Report(bool(stuck), stuck, sorted(set(crossed), key=str))


def programs_from_plans(name: str, plans) -> List[List[tuple]]:
    """Model programs of `megatron_dsv3.pipeline.schedules.ordered_plan(name, ...)`, as the
    executor runs them: the transfers listed since the previous compute op go out as one batch
    before it, and each forward or backward waits for the input it receives from another rank
    (an F&B pair: its forward, then its backward). Messages
    are named (kind, sending stage, direction, micro-batch), as the executor's tags."""
    from megatron_dsv3.pipeline.schedules import COMPUTE, layout, neighbours

    ranks = len(plans)
    lay = layout(name, ranks)
    programs = []
    for rank, plan in enumerate(plans):
        direction = [c if name == "dualpipe" else 0 for c in range(2)]
        peers = [neighbours(lay, rank, c) for c in range(2)]
        program, pending = [], []

        def remote_input(kind, chunk, mb):
            src = peers[chunk][0 if kind == "F" else 1]
            if src is None or src[0] == rank:
                return None
            return (kind, lay.stage(*src), direction[chunk], mb)

        for op in plan:
            if op.kind not in COMPUTE:
                kind = op.kind[-1]
                if op.kind.startswith("SEND"):
                    message = (kind, lay.stage(rank, op.chunk), direction[op.chunk], op.mb)
                    pending.append(("send", op.peer, message))
                else:
                    pending.append(("recv", op.peer, remote_input(kind, op.chunk, op.mb)))
                continue
            if pending:
                program.append(("batch", pending))
                pending = []
            # an F&B pair runs one half after the other (the executor's default pair runner)
            halves = ([("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2)] if op.kind == "FB"
                      else [(op.kind, op.chunk, op.mb)])
            for kind, chunk, mb in halves:
                if kind == "F" or (kind == "B" and peers[chunk][1] is not None):
                    # (the last stage's backward starts from its own loss)
                    message = remote_input(kind, chunk, mb)
                    if message is not None:
                        program.append(("wait", message))
                program.append(("compute", f"{kind}{chunk}.{mb}"))
        if pending:
            program.append(("batch", pending))
        programs.append(program)
    return programs
