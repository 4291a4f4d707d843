"""All-to-alls with uneven splits, started and finished apart, differentiable in both passes.

A `Hop` is one all-to-all of a dispatch or a combine: send[i] rows go to member i of its group,
recv[i] rows come from member i. `start` issues it with async_op=True and returns at once;
`wait` returns what arrived. The caller computes in between, which is where the overlap comes
from.

In autograd the hop is two nodes, `AllToAllStart` and `AllToAllWait`. The backward of an
all-to-all is the all-to-all with send and recv swapped, and it is split the same way: the
backward of the wait issues the reverse transfer, the backward of the start waits for it. The
backward pass runs the forward's nodes in reverse creation order, so whatever the forward computed
between a start and its wait, the backward computes between the reverse transfer's issue and its
wait: the overlap reappears, mirrored.

A hop can carry an encoded wire format (`codec`, e.g. E4M3 bytes with their scales): autograd then
sees a placeholder of the decoded shape travel, and the gradient (in the compute dtype) goes back
as if the rows had been sent unencoded. A later hop can relay received wire rows unchanged
(`relay`); the last wait decodes.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dsv3.dispatch.topology import resolve_group
from megatron_dsv3.lanes import StepTrace, current_lane

Links = List[str]  # per group member: "inter" (another node), "intra" (same node), "self"


class ExchangeError(RuntimeError):
    """An all-to-all of a dispatcher failed in torch.distributed, the backend's error its cause:
    mostly a member of its group that left (its process ended after an error of its own) or a
    network failure. The serving engine turns it into PeerStoppedError inside a step."""


def _failed(group, error: BaseException) -> ExchangeError:
    try:
        members = f"ranks {dist.get_process_group_ranks(group)}"
    except Exception:  # (a destroyed group may no longer say)
        members = "its group"
    return ExchangeError(f"a dispatcher all-to-all over {members} failed: {error}")


class Hop:
    """One all-to-all, forward and backward (`reverse=True` swaps send and recv).

    The bytes handed to torch.distributed for each member are added to `counters` by the link
    they cross. With a `timeline` list, each transfer appends a record {**label, "pass", "lane",
    "start" (issued), "end" (completed), "waited"} (perf_counter seconds); a labelled transfer
    with a "stage" also goes to the StepTrace being recorded, if any (megatron_dsv3.lanes).
    `relayed`: a later hop forwards the received wire rows, so they are kept until
    `take_received`.
    """

    def __init__(self, send: List[int], recv: List[int], group, links: Optional[Links] = None,
                 counters=None, timeline: Optional[list] = None, label: Optional[Dict] = None,
                 relayed: bool = False):
        self.send, self.recv, self.group = list(send), list(recv), group
        self.links, self.counters = links, counters
        self.timeline, self.label, self.relayed = timeline, label, relayed
        self._inflight = None
        self._received: Optional[torch.Tensor] = None

    def start(self, wire: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Issue the transfer of `wire` [sum(send), ...]; returns the receive buffer, valid after
        `wait()`."""
        send, recv = (self.recv, self.send) if reverse else (self.send, self.recv)
        if wire.shape[0] != sum(send):
            raise ValueError(f"all-to-all: {wire.shape[0]} rows to send, splits say {sum(send)}")
        wire = wire.contiguous()
        out = wire.new_empty((sum(recv),) + tuple(wire.shape[1:]))
        record = {"pass": "backward" if reverse else "forward", "lane": current_lane(),
                  "start": time.perf_counter()}
        if self.counters is not None and self.links is not None:
            row_bytes = math.prod(wire.shape[1:]) * wire.element_size()
            self.counters.add_sent([n * row_bytes for n in send], self.links)
        completion = None
        group = resolve_group(self.group)  # the calling thread's lane (forward or backward)
        if group is None or dist.get_world_size(group) == 1:
            out.copy_(wire)
            work = None
            record["end"] = time.perf_counter()
        else:
            try:
                work = dist.all_to_all_single(out, wire, output_split_sizes=recv,
                                              input_split_sizes=send, group=group, async_op=True)
            except RuntimeError as error:
                raise _failed(group, error) from error
            if self.timeline is not None or StepTrace.is_recording():
                completion = work.get_future().then(
                    lambda _: record.__setitem__("end", time.perf_counter()))
        self._inflight = (out, work, completion, record, group)
        return out

    def wait(self) -> torch.Tensor:
        out, work, completion, record, group = self._inflight
        self._inflight = None
        try:
            if work is not None:
                work.wait()
            if completion is not None:
                completion.wait()  # the completion time is recorded
        except RuntimeError as error:
            raise _failed(group, error) from error
        record["waited"] = time.perf_counter()
        record.setdefault("end", record["waited"])
        if self.timeline is not None:
            self.timeline.append({**(self.label or {}), **record})
        if self.label is not None and self.label.get("stage"):
            StepTrace.transfer({**self.label, **record, "kind": "a2a"})
        if self.relayed and record["pass"] == "forward":
            self._received = out
        return out

    def take_received(self) -> torch.Tensor:
        out, self._received = self._received, None
        return out

    def exchange(self, wire: torch.Tensor) -> torch.Tensor:
        """start + wait, outside autograd (routing metadata)."""
        self.start(wire)
        return self.wait()


class AllToAllStart(torch.autograd.Function):
    """x [sum(send), h] -> buffer [sum(recv), h] in flight (read it after AllToAllWait)."""

    @staticmethod
    def forward(ctx, x, hop: Hop, codec, relay: Optional[Hop], select: Optional[torch.Tensor]):
        ctx.hop, ctx.select, ctx.num_rows = hop, select, x.shape[0]
        if relay is not None:  # forward rows another hop received, still encoded
            wire = relay.take_received().index_select(0, select)
        elif codec is not None:
            wire = codec.encode(x)
        else:
            wire = x
        out = hop.start(wire)
        if codec is None and relay is None:
            return out
        # autograd's view of the encoded rows: their decoded shape, no storage
        return x.new_zeros(()).expand(sum(hop.recv), x.shape[1])

    @staticmethod
    def backward(ctx, _grad_passed_through_wait):
        g = ctx.hop.wait()  # the reverse transfer AllToAllWait.backward started
        if ctx.select is not None:
            g = g.new_zeros(ctx.num_rows, g.shape[1]).index_add_(0, ctx.select, g)
        return g, None, None, None, None


class AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, hop: Hop, codec):
        ctx.hop = hop
        wire = hop.wait()
        return codec.decode(wire, x.dtype) if codec is not None else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.hop.start(g, reverse=True)
        return g, None, None


def start(x: torch.Tensor, hop: Hop, codec=None, relay: Optional[Hop] = None,
          select: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Issue a differentiable all-to-all of x (or of `relay`'s received wire rows `select`)."""
    return AllToAllStart.apply(x, hop, codec, relay, select)


def wait(x: torch.Tensor, hop: Hop, codec=None) -> torch.Tensor:
    """Finish the all-to-all `start` returned x for (decoding the wire with `codec`)."""
    return AllToAllWait.apply(x, hop, codec)


def all_to_all(x: torch.Tensor, hop: Hop) -> torch.Tensor:
    """Differentiable all-to-all, finished before returning (its backward still overlaps)."""
    return wait(start(x, hop), hop)


class BackwardMark(torch.autograd.Function):
    """Identity; its backward writes the time into record[key] (to time a backward region)."""

    @staticmethod
    def forward(ctx, x, record: Dict, key: str):
        ctx.record, ctx.key = record, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.record[ctx.key] = time.perf_counter()
        return g, None, None
