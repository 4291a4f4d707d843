"""Differentiable all-to-all with uneven splits, synchronous or started asynchronously.

The backward of an all-to-all is the all-to-all with send and receive splits swapped: gradients
of what a rank received go back to the rank that sent it.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def all_to_all(x: torch.Tensor, send: List[int], recv: List[int], group,
               async_op: bool = False):
    """Raw all-to-all along dim 0: returns (output, work or None)."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    if dist.get_world_size(group) == 1:
        out.copy_(x)
        return out, None
    work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv,
                                  input_split_sizes=send, group=group, async_op=async_op)
    return out, work


class Pending:
    """An all-to-all in flight: `wait()` before reading its output."""

    def __init__(self):
        self.work = None
        self.issued = self.done = None

    def wait(self):
        import time

        if self.work is not None:
            self.work.wait()
            self.work = None
        self.done = time.perf_counter()


class AllToAllStart(torch.autograd.Function):
    """Issue the all-to-all asynchronously; the output is valid after `AllToAllWait`."""

    @staticmethod
    def forward(ctx, x, send, recv, group, pending: Pending):
        import time

        ctx.send, ctx.recv, ctx.group = send, recv, group
        out, pending.work = all_to_all(x, send, recv, group, async_op=True)
        pending.issued = time.perf_counter()
        return out

    @staticmethod
    def backward(ctx, g):
        grad, _ = all_to_all(g.contiguous(), ctx.recv, ctx.send, ctx.group)
        return grad, None, None, None, None


class AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending: Pending):
        pending.wait()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


def differentiable_all_to_all(x, send, recv, group, pending: Optional[Pending] = None):
    """Start (and, without `pending`, finish) a differentiable all-to-all."""
    p = pending or Pending()
    out = AllToAllStart.apply(x, send, recv, group, p)
    return AllToAllWait.apply(out, p) if pending is None else out
