"""Run a rank's schedule (schedules.py) on real model chunks with torch.distributed p2p.

Each compute op calls Megatron's `forward_step_func(data_iterator[chunk], model[chunk])` the way
Megatron's own schedules do (input tensor set with `set_input_tensor`, loss reduced by
`loss_func`, MoE aux-loss and MTP loss scales set), and backward runs autograd on the saved
output. Activations and gradients travel with isend/irecv, tagged by (kind, sending stage,
direction, micro-batch); on backends that ignore tags (NCCL) they travel in the order and the
batches of DeepSeek's DualPipe instead (`p2p_order`, below). A backward marked zero-bubble runs
under WeightGradStore.deferring(): our linear layers queue their weight-gradient GEMMs, and the W op
runs them later. FB ops go through the pair runner `overlap(run_forward, run_backward)`, the
point where one chunk's forward and another's backward may run concurrently (by default one after
the other; megatron_dsv3.pipeline.overlap.threaded_forward_backward runs them together).
Forward passes run on lane 0 and backward passes on lane 1 (megatron_dsv3.lanes): the MoE
dispatcher issues their all-to-alls on that lane's process groups.

Beyond Megatron's keyword arguments the executor takes `overlap=` (the pair runner), `trace=` (a
StepTrace recording this step's operations and the transfers reported during it), `stats=`
(a dict receiving the step's wall time, time waiting on other stages and their ratio, the
measured bubble fraction) and `recv_lookahead=` (default 2: before each op, the receives of the
next two ops are posted, so transfers land while this rank computes; 0 posts each receive just
before the op that needs it). Sends are never waited for inside the step (only at its end);
completed ones release their buffers as the step goes.

`p2p_order=` says how transfers are issued. "tagged" (the default on gloo): as above, each
transfer on its own, matched by its tag. "ordered" (the default on every other backend, NCCL
included): DeepSeek's DualPipe order (`schedules.ordered_plan`): before each compute op, the
transfers the plan lists since the previous one go out as one `batch_isend_irecv` group, and
outputs wait for their place in the plan. NCCL matches sends and receives by order on FIFO
streams and ignores tags: there, receives posted ahead make two neighbours each wait for a send
queued behind the other's receive, and the step hangs (megatron_dsv3.testing.nccl_p2p models
this; tests/pipeline/test_nccl_order.py checks the plan and the executor's own calls against
it). "tagged" is refused on such backends, and `recv_lookahead` applies to "tagged" only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.variable import Variable

from megatron_dsv3.core.gemm import WeightGradStore
from megatron_dsv3.upstream_flags import recompute_modules
from megatron_dsv3.lanes import BACKWARD_LANE, FORWARD_LANE, StepTrace, on_lane
from megatron_dsv3.pipeline.overlap import sequential_forward_backward, threaded_forward_backward
from megatron_dsv3.pipeline.schedules import (COMPUTE, Layout, Op, build, check, layout,
                                               neighbours, ordered_plan)

P2P_ORDERS = ("tagged", "ordered")
_BATCHED_GROUPS: List = []  # pipeline groups whose ranks have met once before batched transfers
_PLANS: Dict[Tuple, Tuple[Op, ...]] = {}  # (schedule, P, N, order, forward_only, rank) -> ops
_RECEIVES: Dict[Tuple, Tuple] = {}  # (schedule, P, N, forward_only, rank, lookahead) -> plan
_RELEASES: Dict[Tuple, Dict] = {}  # (schedule, P, N, order, rank) -> last_gradient_ops


def _rank_ops(schedule: str, ranks: int, rank: int, num_microbatches: int, order: str,
              forward_only: bool, per_direction: int) -> List[Op]:
    """This rank's ops (`build`, or `ordered_plan` for the ordered transfer order), built once
    per configuration: a step then starts its first op without rebuilding every rank's
    schedule (~0.5-1 ms of host time per step)."""
    key = (schedule, ranks, num_microbatches, order, forward_only, rank)
    ops = _PLANS.get(key)
    if ops is None:
        if order == "ordered":
            ops = ordered_plan(schedule, ranks, num_microbatches, forward_only)[rank]
        elif forward_only:
            ops = [Op("F", c, m) for m in range(per_direction) for c in (0, 1)]
        else:
            ops = build(schedule, ranks, num_microbatches)[rank]
        ops = _PLANS[key] = tuple(ops)
    return list(ops)


def _source(peers, kind: str, chunk: int):
    """The (rank, chunk) that sends what op (kind, chunk) receives (None: the first / last
    stage's, which receives nothing)."""
    return peers[chunk][0 if kind == "F" else 1]


def receive_plan(ops: List[Op], peers, rank: int, lookahead: int
                 ) -> Tuple[Tuple[Tuple[str, int, int], ...], ...]:
    """Per op of `ops` (rank `rank`'s, its chunks' `peers` from schedules.neighbours), the
    receives to post before it: those the ops up to `lookahead` ahead read and no earlier op
    posted (keys (kind, chunk, mb); from other ranks only, same-rank hand-offs need none)."""
    seen, plan = set(), []
    for i in range(len(ops)):
        now = []
        for op in ops[i:i + 1 + lookahead]:
            reads = {"F": (("F", op.chunk, op.mb),), "B": (("B", op.chunk, op.mb),),
                     "FB": (("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2))}.get(op.kind, ())
            for key in reads:
                src = _source(peers, key[0], key[1])
                if key not in seen and src is not None and src[0] != rank:
                    now.append(key)
                seen.add(key)
        plan.append(tuple(now))
    return tuple(plan)


def last_gradient_ops(ops: List[Op]) -> Dict[int, Tuple[int, ...]]:
    """{i: chunks whose last gradient contribution of the step is compute op i} of a rank's ops
    (`build` or the compute ops of `ordered_plan`, in order): a chunk's backward passes (B, the
    backward half of FB) and the W ops that run its deferred weight gradients (the store is a
    queue: each zero-bubble B adds a unit, each W runs the oldest)."""
    last: Dict[int, int] = {}
    queue: List[int] = []
    for i, op in enumerate(o for o in ops if o.kind in COMPUTE):
        if op.kind == "B":
            last[op.chunk] = i
            if op.zb:
                queue.append(op.chunk)
        elif op.kind == "FB":
            last[op.chunk2] = i
        elif op.kind == "W":
            last[queue.pop(0)] = i
    out: Dict[int, Tuple[int, ...]] = {}
    for chunk, i in sorted(last.items()):
        out[i] = out.get(i, ()) + (chunk,)
    return out


class _GradSync:
    """Megatron's gradient-sync protocol under DistributedDataParallel's overlap_grad_reduce:
    Megatron-LM gives `config.no_sync_func` (a chunk's `no_sync`, one per chunk) and, with
    align_grad_reduce, `config.grad_sync_func` (its `start_grad_sync`). The step runs with every
    chunk's sync off, so DDP marks no gradient ready whatever the micro-batch count (with sync
    on, each micro-batch marked each parameter once more, and a step of another count than the
    first, e.g. under --rampup-batch-size, never started its buckets' reductions: Megatron's
    finish_grad_sync failed); after a chunk's last gradient contribution its sync is back on and
    its reduction starts (grad_sync_func), while the rest of the step runs. Without
    grad_sync_func, finalize's finish_grad_sync does the reduction."""

    def __init__(self, config, model: List):
        no_sync, start = config.no_sync_func, config.grad_sync_func
        per_chunk = isinstance(no_sync, (list, tuple))
        if per_chunk and len(no_sync) != len(model):
            raise ValueError(f"config.no_sync_func has {len(no_sync)} entries for "
                             f"{len(model)} model chunks: allowed is one per chunk or one "
                             "for the whole model")
        if isinstance(start, (list, tuple)) and len(start) != len(model):
            raise ValueError(f"config.grad_sync_func has {len(start)} entries for "
                             f"{len(model)} model chunks: allowed is one per chunk or one "
                             "for every chunk")
        # (one no_sync for the whole model is released once, after both chunks' last ops)
        self.no_sync = list(no_sync) if per_chunk else [no_sync]
        self.start = (list(start) if isinstance(start, (list, tuple)) else
                      [start] * len(model) if start is not None else None)
        self.model, self.per_chunk = model, per_chunk
        self.open: Dict[int, object] = {}  # no_sync slot -> its entered context
        self.released: set = set()

    def begin(self) -> None:
        for slot, func in enumerate(self.no_sync):
            ctx = func()
            ctx.__enter__()
            self.open[slot] = ctx

    def release(self, chunks: Tuple[int, ...]) -> None:
        """`chunks` have no more gradients to come this step: sync on, reductions started."""
        self.released.update(chunks)
        slots = chunks if self.per_chunk else ((0,) if len(self.released) == len(self.model)
                                               else ())
        for slot in slots:
            ctx = self.open.pop(slot, None)
            if ctx is not None:
                ctx.__exit__(None, None, None)
        if self.start is not None:
            for c in chunks:
                self.start[c](self.model[c].parameters())

    def end(self, ok: bool) -> None:
        """Sync back on everywhere; after a complete step, the reductions of chunks not yet
        released start (a chunk without any backward op on this rank)."""
        rest = [c for c in range(len(self.model)) if c not in self.released]
        for ctx in self.open.values():
            ctx.__exit__(None, None, None)
        self.open.clear()
        if ok and self.start is not None:
            for c in rest:
                self.start[c](self.model[c].parameters())


class _Runner:
    def __init__(self, lay: Layout, rank: int, model: List, forward_step_func, data_iterator,
                 num_microbatches: int, tensor_shape, dtype, config, group, forward_only: bool,
                 collect_non_loss_data: bool, overlap: Callable, trace: Optional[StepTrace]):
        self.lay, self.rank, self.model = lay, rank, model
        self.overlap, self.trace = overlap, trace
        self.forward_step_func, self.config, self.group = forward_step_func, config, group
        if data_iterator is None:
            data_iterator = [None, None]
        if not isinstance(data_iterator, (list, tuple)) or len(data_iterator) != 2:
            raise ValueError(
                f"data_iterator={data_iterator!r} is invalid: allowed values are a list of two "
                "iterators, one per chunk, or None. One iterator shared by both chunks would be "
                "read twice per micro-batch on a rank whose chunks both read data (tokens of one "
                "micro-batch, labels of the next); Megatron-LM's loop passes one, and "
                "megatron_dsv3.pretrain_gpt's schedule splits it per chunk")
        self.data = list(data_iterator)
        self.n, self.shape, self.dtype = num_microbatches, tensor_shape, dtype
        self.forward_only, self.collect = forward_only, collect_non_loss_data
        self.inputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.outputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.local: Dict[Tuple[str, int, int], torch.Tensor] = {}  # same-rank hand-offs
        self.sends: List = []  # ([works], [tensors kept alive until the works are done])
        self._sends_lock = threading.Lock()
        self.losses: Dict[Tuple[int, int], object] = {}
        self.deallocated: set = set()  # (chunk, mb) whose sent output's values were freed
        self.global_rank = dist.get_process_group_ranks(group)
        self.recv_wait = 0.0  # seconds spent waiting for another stage: this rank's bubble
        self.device = next(model[0].parameters()).device
        # loss tokens of this rank's last stages (Megatron's finalize_model_grads takes the
        # step's total on the model's device)
        self.num_tokens = torch.zeros((), dtype=torch.int, device=self.device)
        # per chunk, computed once: (prev, next) neighbour, own stage, p2p direction
        self.peers = [neighbours(lay, rank, c) for c in range(2)]
        self.stages = [lay.stage(rank, c) for c in range(2)]
        self.directions = [c if lay.name == "dualpipe" else 0 for c in range(2)]
        self.posted: Dict[Tuple[str, int, int], Tuple[object, torch.Tensor]] = {}
        self.ordered = False  # p2p_order="ordered": transfers in batches where the plan puts them
        self.outbox: Dict[Tuple[str, int, int], torch.Tensor] = {}  # outputs awaiting their SEND
        self.pending: List = []  # the ordered plan's transfers since the last compute op
        # compute op index -> chunks to release from no_sync after it (_GradSync)
        self.releases: Dict[int, Tuple[int, ...]] = {}
        self.first_forward = [True, True]  # per chunk: its first forward of the step is ahead
        self.first_microbatch = True  # Megatron's check_first_val_step (set by the caller)
        self.grad_sync: Optional[_GradSync] = None
        from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
        from megatron.core.utils import get_attr_wrapped_model

        self.calc_loss = forward_step_calc_loss
        self.set_input = [get_attr_wrapped_model(m, "set_input_tensor") for m in model]
        # Megatron's timers (Megatron-LM's loop sets config.timers): `forward` starts
        # 'forward-compute', forward_step_calc_loss stops it, as in Megatron's forward_step
        self.timers = getattr(config, "timers", None)
        self.scales_set = False  # forward_step_calc_loss has set this step's loss scales
        # tagged transfers go through the process group's send / recv with group ranks
        self.pg = group if group is not None else dist.group.WORLD

    # -- point to point --------------------------------------------------------------------------
    def _tag(self, kind: str, from_stage: int, direction: int, mb: int) -> int:
        return ((0 if kind == "F" else 1) * 2 + direction) * 10_000_000 + from_stage * 100_000 + mb

    def _receive_into(self, kind: str, chunk: int, mb: int) -> Tuple[int, int, torch.Tensor]:
        """(source's global rank, tag, fresh buffer) of the transfer op (kind, chunk, mb)
        receives from another rank."""
        src = _source(self.peers, kind, chunk)
        tag = self._tag(kind, self.lay.stage(*src), self.directions[chunk], mb)
        return self.global_rank[src[0]], tag, torch.empty(self.shape, dtype=self.dtype,
                                                          device=self.device)

    def _send_tag(self, kind: str, chunk: int, mb: int) -> int:
        return self._tag(kind, self.stages[chunk], self.directions[chunk], mb)

    def _post(self, kind: str, chunk: int, mb: int) -> None:
        """Post the receive op (kind, chunk, mb) needs from another rank (`receive_plan` says
        which and when): the transfer then lands while this rank still computes."""
        _, tag, buf = self._receive_into(kind, chunk, mb)
        # the process group's own call with the group rank: torch.distributed.irecv's checks
        # and rank translation cost host time on every transfer (they run cold after each
        # compute on a small machine: ~0.1 ms for a send, measured in docs/benchmarks.md)
        work = self.pg.recv([buf], _source(self.peers, kind, chunk)[0], tag)
        self.posted[(kind, chunk, mb)] = ([work], buf)

    def _recv(self, kind: str, chunk: int, mb: int) -> Optional[torch.Tensor]:
        src = _source(self.peers, kind, chunk)
        if src is None:
            return None
        if src[0] == self.rank:
            return self.local.pop((kind, self.lay.stage(*src), mb))
        if (kind, chunk, mb) not in self.posted:  # a plan error, never a wait for nothing
            plan = "ordered p2p plan" if self.ordered else "receive plan"
            raise RuntimeError(f"pipeline rank {self.rank}: the {plan} did not post the "
                               f"receive of {kind}{chunk}.{mb} before its op")
        works, buf = self.posted.pop((kind, chunk, mb))
        t0 = time.perf_counter()
        for work in works:
            work.wait()
        self.recv_wait += time.perf_counter() - t0
        return buf

    def _send(self, kind: str, chunk: int, mb: int, tensor: torch.Tensor) -> None:
        dst = self.peers[chunk][1 if kind == "F" else 0]
        if dst is None:
            return
        stage = self.stages[chunk]
        if dst[0] == self.rank:
            self.local[(kind, stage, mb)] = tensor.detach()
            return
        t = tensor.detach().contiguous()
        if self.ordered:  # sent where the plan's SEND op stands
            self.outbox[(kind, chunk, mb)] = t
            return
        work = self.pg.send([t], dst[0], self._send_tag(kind, chunk, mb))  # (as in _post)
        # completed sends release their buffers as the step goes (waited at the end otherwise);
        # under a lock: F&B pairs in two threads send from both (a check by one thread and a pop
        # by the other would drop an unfinished send)
        with self._sends_lock:
            self.sends.append(([work], [t]))
            while self.sends and self.sends[0][0][0].is_completed():
                self.sends.pop(0)

    # -- compute -----------------------------------------------------------------------------------
    def _is_last(self, chunk: int) -> bool:
        return self.peers[chunk][1] is None

    def forward(self, chunk: int, mb: int) -> None:
        x = self._recv("F", chunk, mb)
        if x is not None and not self.forward_only:
            x.requires_grad_()
        model = self.model[chunk]
        if self.first_forward[chunk]:
            # Megatron's forward_step on a chunk's first micro-batch of the step: Transformer
            # Engine's FP8 linears then quantise their weights again (later micro-batches reuse
            # that cache; without the call it kept the weights of the first step)
            self.first_forward[chunk] = False
            if self.first_microbatch and hasattr(model, "set_is_first_microbatch"):
                model.set_is_first_microbatch()
        self.set_input[chunk](x)  # through a DDP wrapper too
        if self.timers is not None:
            self.timers("forward-compute", log_level=2).start()
        with torch.set_grad_enabled(not self.forward_only):
            output, loss_func = self.forward_step_func(self.data[chunk], model)
        last = self._is_last(chunk)
        if last or not self.scales_set:
            # Megatron's: the loss on a last stage; on every stage it also stops the
            # 'forward-compute' timer and sets the step's MoE aux-loss and MTP loss gradient
            # scales (1 / micro-batches), which the backward passes use
            store: List = []
            output, tokens = self.calc_loss(
                model, output, loss_func, self.config, None, self.collect, self.n, store,
                cp_group_size=1, is_last_stage=last)
            self.scales_set = True
        elif self.timers is not None:
            # the scales are the same for every micro-batch of the step: set by this step's
            # first forward (a call per forward costs host time on every stage)
            self.timers("forward-compute").stop()
        if last:
            self.num_tokens += torch.as_tensor(tokens, device=self.device)
            if store:
                self.losses[(chunk, mb)] = store[0]
        else:
            if output.shape != self.shape:  # (autograd's engine would broadcast a gradient)
                raise ValueError(
                    f"pipeline rank {self.rank}: chunk {chunk}'s output has shape "
                    f"{tuple(output.shape)}; the pipeline's transfers carry (seq_length, "
                    f"micro_batch_size, hidden_size) = {tuple(self.shape)}: allowed is that shape "
                    "(after adjust_tensor_shapes_fn, when one is given)")
            self._send("F", chunk, mb, output)
            if getattr(self.config, "deallocate_pipeline_outputs", False) \
                    and not self.forward_only and output._base is None:
                # Megatron's deallocate_output_tensor: the graph needs only the output's grad_fn
                # (its shape is recorded there); the values went to the next stage, whose send
                # buffer keeps them until the transfer is done
                output.data = torch.empty((1,), device=output.device, dtype=output.dtype)
                self.deallocated.add((chunk, mb))
        if not self.forward_only:
            self.inputs[(chunk, mb)] = x
            self.outputs[(chunk, mb)] = output

    def backward(self, chunk: int, mb: int, zb: bool) -> None:
        output = self.outputs.pop((chunk, mb))
        x = self.inputs.pop((chunk, mb))
        grad = None if self._is_last(chunk) else self._recv("B", chunk, mb)
        if grad is None and self.config.grad_scale_func is not None:
            output = self.config.grad_scale_func(output)
        if grad is None:  # the loss: a scalar (torch.autograd.backward's implicit gradient)
            if output.numel() != 1:
                raise RuntimeError(f"pipeline rank {self.rank}: the last stage's output of "
                                   f"chunk {chunk} has shape {tuple(output.shape)}; its "
                                   "backward starts from a scalar loss")
            grad = torch.ones_like(output, memory_format=torch.preserve_format)
        # autograd's engine directly, as Megatron's custom_backward: torch.autograd.backward
        # would compare grad's shape with a deallocated output's 1-element placeholder (the
        # engine checks it against the shape the graph recorded), and its Python checks cost
        # host time on every backward
        self.deallocated.discard((chunk, mb))
        if self.timers is not None:
            self.timers("backward-compute", log_level=2).start()
        # the engine runs the backward on this thread: on CUDA it would otherwise run the nodes
        # on the device's autograd worker thread, where this thread's lane (a thread-local)
        # reads 0, and the MoE dispatcher would issue the backward's all-to-alls on the
        # forward lane's groups (on the CPU it runs here anyway)
        with WeightGradStore.deferring(zb), torch.autograd.set_multithreading_enabled(False):
            Variable._execution_engine.run_backward(
                tensors=(output,), grad_tensors=(grad,), keep_graph=False, create_graph=False,
                inputs=(), allow_unreachable=True, accumulate_grad=True)
        if zb:
            WeightGradStore.flush()
        if self.timers is not None:
            self.timers("backward-compute").stop()
        if x is not None:
            self._send("B", chunk, mb, x.grad)

    def _run_forward(self, chunk: int, mb: int, pair: bool) -> None:
        with on_lane(FORWARD_LANE):
            if self.trace is None:
                self.forward(chunk, mb)
            else:
                with self.trace.timing("F", chunk, mb, FORWARD_LANE, pair):
                    self.forward(chunk, mb)

    def _run_backward(self, chunk: int, mb: int, zb: bool, pair: bool) -> None:
        with on_lane(BACKWARD_LANE):
            if self.trace is None:
                self.backward(chunk, mb, zb)
            else:
                with self.trace.timing("B", chunk, mb, BACKWARD_LANE, pair):
                    self.backward(chunk, mb, zb)

    def _run_op(self, op: Op) -> None:
        if op.kind == "F":
            self._run_forward(op.chunk, op.mb, False)
        elif op.kind == "B":
            self._run_backward(op.chunk, op.mb, op.zb, False)
        elif op.kind == "W":  # deferred weight gradients: backward compute in Megatron's timers
            if self.timers is not None:
                self.timers("backward-compute", log_level=2).start()
            WeightGradStore.pop()
            if self.timers is not None:
                self.timers("backward-compute").stop()
        elif op.kind == "FB":
            self.overlap(lambda: self._run_forward(op.chunk, op.mb, True),
                         lambda: self._run_backward(op.chunk2, op.mb2, False, True))

    def run(self, ops: List[Op], posts) -> Dict[str, float]:
        """Run `ops`, posting the receives `posts[i]` (`receive_plan`) before op i; -> wall
        time, time spent waiting on other stages and their ratio."""
        start = time.perf_counter()
        releases = self.releases
        for i, (op, keys) in enumerate(zip(ops, posts)):
            for kind, chunk, mb in keys:
                self._post(kind, chunk, mb)
            self._run_op(op)
            if i in releases:
                self.grad_sync.release(releases[i])
        return self._finish(start)

    def _finish(self, start: float) -> Dict[str, float]:
        """Wait for the step's sends; -> wall time since `start`, time spent waiting on other
        stages and their ratio."""
        for works, _ in self.sends:
            for work in works:
                work.wait()
        self.sends.clear()
        wall = time.perf_counter() - start
        return {"wall_s": wall, "recv_wait_s": self.recv_wait,
                "bubble_fraction": self.recv_wait / wall if wall > 0 else 0.0}

    # -- the ordered plan (NCCL) ---------------------------------------------------------------
    def _commit(self) -> None:
        """Issue the transfers listed since the last compute op as one batch (one NCCL group:
        its sends and receives progress together)."""
        if not self.pending:
            return
        p2p, recvs, sends = [], [], []
        for op in self.pending:
            kind = op.kind[-1]
            if op.kind.startswith("RECV"):
                peer, tag, buf = self._receive_into(kind, op.chunk, op.mb)
                recvs.append(((kind, op.chunk, op.mb), buf, len(p2p)))
                p2p.append(dist.P2POp(dist.irecv, buf, peer, self.group, tag))
            else:
                t = self.outbox.pop((kind, op.chunk, op.mb))
                sends.append((t, len(p2p)))
                p2p.append(dist.P2POp(dist.isend, t, self.global_rank[op.peer], self.group,
                                      self._send_tag(kind, op.chunk, op.mb)))
        self.pending = []
        works = dist.batch_isend_irecv(p2p)
        # one work per transfer (gloo: each waited once, a second wait on a receive would wait
        # for another message), or one for the whole group (NCCL's coalescing: a receive then
        # waits for its group, which is when its data is there anyway)
        per_op = len(works) == len(p2p)
        for key, buf, i in recvs:
            self.posted[key] = ([works[i]] if per_op else list(works), buf)
        if sends:
            self.sends.append(([works[i] for _, i in sends] if per_op else list(works),
                               [t for t, _ in sends]))

    def run_ordered(self, plan: List[Op]) -> Dict[str, float]:
        """Run this rank's `ordered_plan`: before each compute op the pending transfers go out
        as one batch; outputs wait in the outbox for their SEND."""
        start = time.perf_counter()
        self.ordered = True
        i = -1  # compute ops so far
        for op in plan:
            if op.kind not in COMPUTE:
                self.pending.append(op)
                continue
            self._commit()
            self._run_op(op)
            i += 1
            if i in self.releases:
                self.grad_sync.release(self.releases[i])
        self._commit()
        step = self._finish(start)
        if self.outbox or self.posted:
            raise RuntimeError(f"pipeline rank {self.rank}: the ordered p2p plan left "
                               f"{sorted(self.outbox)} unsent and {sorted(self.posted)} unread")
        return step


def _forward_backward(schedule: str, *, forward_step_func, data_iterator, model, num_microbatches,
                      seq_length, micro_batch_size, decoder_seq_length=None, forward_only=False,
                      collect_non_loss_data=False, first_val_step=None,
                      adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None,
                      force_all_reduce=False, overlap: Optional[Callable] = None,
                      trace: Optional[StepTrace] = None, stats: Optional[Dict] = None,
                      recv_lookahead: Optional[int] = None, p2p_order: Optional[str] = None):
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    if not isinstance(model, list) or len(model) != 2:
        raise ValueError(f"{schedule} needs this rank's two model chunks as a list "
                         f"(model=[chunk0, chunk1]); got {type(model).__name__}")
    if recv_lookahead is not None and (not isinstance(recv_lookahead, int) or recv_lookahead < 0):
        raise ValueError(f"recv_lookahead={recv_lookahead!r}: allowed values are integers >= 0 "
                         f"(how many ops ahead receives are posted)")
    if p2p_order not in (None,) + P2P_ORDERS:
        raise ValueError(f"p2p_order={p2p_order!r}: allowed values are None (by backend), "
                         f"{', '.join(map(repr, P2P_ORDERS))}")
    group = getattr(pg_collection, "pp", None) or parallel_state.get_pipeline_model_parallel_group()
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    check(schedule, ranks, num_microbatches)
    config = get_model_config(model[0])
    lay = layout(schedule, ranks)
    shape = (seq_length, micro_batch_size, config.hidden_size)
    if adjust_tensor_shapes_fn is not None:
        shape = tuple(adjust_tensor_shapes_fn([shape], [shape])[0][0])
    dtype = config.pipeline_dtype or config.params_dtype
    per_direction = num_microbatches // 2 if schedule == "dualpipe" else num_microbatches
    device = next(model[0].parameters()).device
    if overlap is threaded_forward_backward:
        _refuse_threaded_pairs(config, device)
    runner = _Runner(lay, rank, model, forward_step_func, data_iterator, per_direction, shape,
                     dtype, config, group, forward_only, collect_non_loss_data,
                     overlap or sequential_forward_backward, trace)
    runner.n = num_microbatches  # losses are averaged over every micro-batch of the step
    # Megatron's check_first_val_step: an evaluation step after the first keeps the FP8 caches
    runner.first_microbatch = bool(first_val_step) if (first_val_step is not None
                                                       and forward_only) else True
    order = _p2p_order(p2p_order, recv_lookahead, group, device)
    ops = _rank_ops(schedule, ranks, rank, num_microbatches, order, forward_only,
                    per_direction)
    if order == "ordered" and group not in _BATCHED_GROUPS:
        # torch: the first collective on a group that batch_isend_irecv uses must involve
        # every rank of it (NCCL creates the communicator then); the plan's first batches
        # pair only neighbours, so every rank of the group meets here once first
        dist.barrier(group=group)
        _BATCHED_GROUPS.append(group)
    timers = getattr(config, "timers", None)
    if timers is not None:  # as Megatron's schedules: the whole step, finalize included
        timers("forward-backward", log_level=1).start(
            barrier=getattr(config, "barrier_with_L1_time", False))
    WeightGradStore.clear()
    if not forward_only and getattr(config, "no_sync_func", None) is not None:
        runner.grad_sync = _GradSync(config, model)
        key = (schedule, ranks, num_microbatches, order, rank)
        releases = _RELEASES.get(key)
        if releases is None:
            releases = _RELEASES[key] = last_gradient_ops(ops)
        runner.releases = releases
        runner.grad_sync.begin()
    ok = False
    try:
        with trace.recording() if trace is not None else contextlib.nullcontext():
            if order == "ordered":
                step = runner.run_ordered(ops)
            else:
                # before each op the receives of the next `lookahead` ops are posted (each
                # once), so an activation or gradient arrives while the rank still computes; a
                # buffer then exists at most `lookahead` ops early. Planned once per
                # configuration.
                lookahead = 2 if recv_lookahead is None else recv_lookahead
                key = (schedule, ranks, num_microbatches, forward_only, rank, lookahead)
                posts = _RECEIVES.get(key)
                if posts is None:
                    posts = _RECEIVES[key] = receive_plan(ops, runner.peers, rank, lookahead)
                step = runner.run(ops, posts)
        ok = True
    finally:
        if runner.grad_sync is not None:
            runner.grad_sync.end(ok)
    WeightGradStore.check_drained(f"{schedule} step on pipeline rank {rank}")
    if stats is not None:
        stats.update(step)
    if not forward_only:
        if config.calculate_per_token_loss:
            # Megatron's finalize_model_grads broadcasts the token count from the last pipeline
            # rank, which holds no last stage under DualPipeV (rank 0 does) and one direction's
            # under DualPipe: every rank gets the step's total first
            dist.all_reduce(runner.num_tokens, group=group)
        if schedule == "dualpipe":
            # the router-bias update (in finalize_model_grads) reads each copy's expert loads
            sum_mirrored_expert_loads(model, group)
        if config.finalize_model_grads_func is not None:
            # with the arguments Megatron's schedules pass (Megatron-LM's loop gives
            # force_all_reduce=True on the iterations whose weight gradients it saves)
            config.finalize_model_grads_func(
                model, runner.num_tokens if config.calculate_per_token_loss else None,
                pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        if schedule == "dualpipe":
            # after finalize: DDP's reduction (overlapped with backward) has then finished
            # writing main_grad; the sum commutes with its averaging and the 1 / tokens scale
            sync_mirrored_grads(model, group)
    if timers is not None:
        timers("forward-backward").stop()
    return [runner.losses[k] for k in sorted(runner.losses)]


def _refuse_threaded_pairs(config, device: torch.device) -> None:
    """ValueError naming why F&B pairs in two threads cannot run with `config` on `device`."""
    if device.type == "cuda":
        raise ValueError(
            "overlap=threaded_forward_backward is refused on CUDA: the two threads share the "
            "default stream, so each lane's collectives wait through it for the other lane's, "
            "and expert-parallel ranks whose threads issue them in different orders deadlock "
            "(megatron_dsv3.testing.nccl_p2p shows the cycle; docs/backends.md). Allowed on "
            "CUDA: overlap=None (the pair one half after the other)")
    tp = getattr(config, "tensor_model_parallel_size", 1) or 1
    if tp > 1:
        raise ValueError(
            f"overlap=threaded_forward_backward is refused with tensor_model_parallel_size={tp}: "
            "the two threads would issue the tensor-parallel all-reduces of the pair's halves in "
            "an order that differs between ranks (they have no lanes), pairing one rank's "
            "forward all-reduce with another's backward one. Allowed: overlap=None, or "
            "tensor_model_parallel_size=1")
    rerun = recompute_reruns_random_draws(config)
    if rerun:
        raise ValueError(
            f"overlap=threaded_forward_backward is refused with {rerun}: a recompute in the "
            "backward thread sets and restores the process's random-number state while the "
            "forward thread draws dropout or jitter noise from it (results then differ from "
            "sequential pairs, and between runs). Allowed: overlap=None, or no dropout and "
            "jitter, or recompute_modules without core_attn, mlp and shared_experts")


# recompute modules that run their module again in backward, random draws included (the others
# recompute norms and activations, which draw nothing)
_RERUN_MODULES = ("core_attn", "mlp", "shared_experts")


def recompute_reruns_random_draws(config) -> str:
    """'' unless a recompute re-runs random draws in backward (dropout or router jitter inside a
    module that is run again); else the settings that do, for the error message."""
    noise = [f"{f}={getattr(config, f)}" for f in ("hidden_dropout", "attention_dropout",
                                                     "moe_input_jitter_eps")
             if getattr(config, f, None)]
    granularity = getattr(config, "recompute_granularity", None)
    if not noise or granularity is None:
        return ""
    if granularity == "full":
        return f"recompute_granularity='full' and {', '.join(noise)}"
    rerun = [m for m in recompute_modules(config) if m in _RERUN_MODULES]
    return f"recompute_modules {rerun} and {', '.join(noise)}" if rerun else ""


def _backend(group, device) -> str:
    """The backend that carries `device`'s tensors in `group` ("gloo", "nccl", ...)."""
    backend = str(dist.get_backend(group))
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl"
        table = dict(item.split(":", 1) for item in backend.split(","))
        return table.get(device.type, backend)
    return backend


def _p2p_order(asked: Optional[str], recv_lookahead: Optional[int], group, device) -> str:
    """'tagged' on gloo (messages matched by tag: receives may be posted early, in any order);
    'ordered' elsewhere (NCCL matches by order on FIFO streams, where early receives deadlock)."""
    backend = _backend(group, device)
    order = asked or ("tagged" if backend == "gloo" else "ordered")
    if order == "tagged" and backend != "gloo":
        raise ValueError(f"p2p_order='tagged' needs a backend that matches point-to-point "
                         f"messages by tag (gloo); this pipeline group's {backend!r} matches them "
                         f"by order and would hang: use p2p_order='ordered' (its default)")
    if order == "ordered" and recv_lookahead is not None:
        raise ValueError(f"recv_lookahead={recv_lookahead} applies to p2p_order='tagged' only: "
                         f"the ordered plan posts receives where DeepSeek's DualPipe does")
    return order


def _grad_of(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient the optimizer reads: Megatron DDP's main_grad buffer, else .grad."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def _flat_grads(chunk) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                      for p in chunk.parameters() if p.requires_grad
                      for g in [_grad_of(p)]])


def _add_flat(chunk, flat: torch.Tensor) -> None:
    offset = 0
    for p in chunk.parameters():
        if not p.requires_grad:
            continue
        main = getattr(p, "main_grad", None)
        target = main if main is not None else p.grad
        g = flat[offset:offset + p.numel()].view_as(p).to(target.dtype if target is not None
                                                          else p.dtype)
        if target is None:
            p.grad = g.clone()
        else:
            target.add_(g)
        offset += p.numel()


def _expert_loads(chunk) -> List[torch.Tensor]:
    """The routers' token counts since the last bias update (the modules Megatron's
    finalize_model_grads updates: an `expert_bias` and `local_tokens_per_expert`), in module
    order."""
    return [m.local_tokens_per_expert for m in chunk.modules()
            if getattr(m, "expert_bias", None) is not None
            and getattr(m, "local_tokens_per_expert", None) is not None]


def _exchange_with_mirror(mine: List[torch.Tensor], group) -> List[torch.Tensor]:
    """DualPipe keeps every stage twice: rank r's chunk 0 (stage r) is rank P-1-r's chunk 1, and
    rank r's chunk 1 is rank P-1-r's chunk 0. Sends this rank's per-chunk tensors [chunk 0,
    chunk 1] to the mirror -> the mirror's tensors of the same stages [its chunk 1, its chunk 0]."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    peer = dist.get_process_group_ranks(group)[ranks - 1 - rank]
    into = [torch.empty_like(mine[0]), torch.empty_like(mine[1])]
    # tag c: "the sender's chunk c", which the receiver adds to its chunk 1 - c
    ops = [dist.P2POp(dist.isend, mine[0], peer, group, tag=0),
           dist.P2POp(dist.isend, mine[1], peer, group, tag=1),
           dist.P2POp(dist.irecv, into[1], peer, group, tag=0),
           dist.P2POp(dist.irecv, into[0], peer, group, tag=1)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return into


def sync_mirrored_grads(model: List, group) -> None:
    """Each rank sends both chunks' gradients (DDP's main_grad where present) to its mirror and
    adds what it receives, so both copies of a stage take the same optimizer step."""
    into = _exchange_with_mirror([_flat_grads(model[0]), _flat_grads(model[1])], group)
    _add_flat(model[0], into[0])
    _add_flat(model[1], into[1])


def sum_mirrored_expert_loads(model: List, group) -> None:
    """Both copies of a stage route half of the step's micro-batches: each router's expert loads
    become the sum of both copies', so both take the aux-loss-free bias step of the whole batch."""
    loads = [_expert_loads(chunk) for chunk in model]
    if not loads[0] and not loads[1]:
        return  # (the mirror holds the same stages: it has none either)
    mine = [torch.cat([t.flatten().float() for t in ts]) if ts else
            torch.zeros(0, device=next(chunk.parameters()).device)
            for ts, chunk in zip(loads, model)]
    into = _exchange_with_mirror(mine, group)
    for ts, got in zip(loads, into):
        offset = 0
        for t in ts:
            t.add_(got[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()


def forward_backward_dualpipev(**kwargs):
    """Megatron's forward_backward_pipelining_without_interleaving signature; `model` is this
    rank's [chunk for stage r, chunk for stage 2P-1-r] (bare or wrapped, e.g. in Megatron's
    DistributedDataParallel) and `data_iterator` one iterator per chunk (rank 0's two chunks both
    read the batch: tokens for the embedding, labels for the loss). Also takes `overlap=`,
    `trace=` and `stats=` (module docstring)."""
    return _forward_backward("dualpipev", **kwargs)


def forward_backward_dualpipe(**kwargs):
    """As forward_backward_dualpipev for DualPipe: `model` = [stage r (direction 0), stage P-1-r
    (direction 1)], half of the micro-batches per direction; the mirrored copies' gradients are
    summed before finalize_model_grads_func."""
    return _forward_backward("dualpipe", **kwargs)
