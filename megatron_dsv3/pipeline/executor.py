"""Run a rank's schedule (schedules.py) on real model chunks with torch.distributed p2p.

Each compute op calls Megatron's `forward_step_func(data_iterator[chunk], model[chunk])` the way
Megatron's own schedules do (input tensor set with `set_input_tensor`, loss reduced by
`loss_func`, MoE aux-loss and MTP loss scales set), and backward runs autograd on the saved
output. Activations and gradients travel with isend/irecv, tagged by (kind, sending stage,
direction, micro-batch) so that no global ordering of point-to-point calls is needed: any
backend (gloo on CPU, NCCL on GPU) works. A backward marked zero-bubble runs under
WeightGradStore.deferring(): our linear layers queue their weight-gradient GEMMs, and the W op
runs them later. FB ops go through `overlapped_forward_backward`, the point where one chunk's
forward and another's backward may run concurrently (by default one after the other;
megatron_dsv3.pipeline.overlap.threaded_forward_backward runs them together). Forward passes
dispatch their MoE tokens on lane 0 of the dispatcher's process groups, backward passes on lane 1.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_dsv3.core.gemm import WeightGradStore
from megatron_dsv3.dispatch.topology import dispatch_lane
from megatron_dsv3.pipeline.schedules import Layout, Op, build, check, layout, neighbours


# Timing of this rank's last pipelined step: wall time, time waiting on other stages
# (activations or gradients not there yet) and their ratio, the measured bubble fraction.
LAST_STEP_STATS: Dict[str, float] = {}


def _sequential(run_forward: Callable[[], None], run_backward: Callable[[], None]) -> None:
    run_forward()
    run_backward()


_OVERLAP_HOOK: Callable = _sequential


def set_overlapped_forward_backward(hook: Optional[Callable]) -> None:
    """Install `hook(run_forward, run_backward)` for FB ops (None restores sequential)."""
    global _OVERLAP_HOOK
    _OVERLAP_HOOK = hook or _sequential


def overlapped_forward_backward(run_forward, run_backward) -> None:
    _OVERLAP_HOOK(run_forward, run_backward)


class _Runner:
    def __init__(self, lay: Layout, rank: int, model: List, forward_step_func, data_iterator,
                 num_microbatches: int, tensor_shape, dtype, config, group, forward_only: bool,
                 collect_non_loss_data: bool):
        self.lay, self.rank, self.model = lay, rank, model
        self.forward_step_func, self.config, self.group = forward_step_func, config, group
        self.data = data_iterator if isinstance(data_iterator, list) else [data_iterator] * 2
        self.n, self.shape, self.dtype = num_microbatches, tensor_shape, dtype
        self.forward_only, self.collect = forward_only, collect_non_loss_data
        self.inputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.outputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.local: Dict[Tuple[str, int, int], torch.Tensor] = {}  # same-rank hand-offs
        self.sends: List = []
        self.losses: Dict[Tuple[int, int], object] = {}
        self.num_tokens = torch.zeros((), dtype=torch.int)
        self.global_rank = dist.get_process_group_ranks(group)
        self.recv_wait = 0.0  # seconds spent waiting for another stage: this rank's bubble
        self.device = next(model[0].parameters()).device

    # -- point to point --------------------------------------------------------------------------
    def _tag(self, kind: str, from_stage: int, direction: int, mb: int) -> int:
        return ((0 if kind == "F" else 1) * 2 + direction) * 10_000_000 + from_stage * 100_000 + mb

    def _direction(self, chunk: int) -> int:
        return chunk if self.lay.name == "dualpipe" else 0

    def _recv(self, kind: str, chunk: int, mb: int) -> Optional[torch.Tensor]:
        prev, nxt = neighbours(self.lay, self.rank, chunk)
        src = prev if kind == "F" else nxt
        if src is None:
            return None
        direction = self._direction(chunk)
        from_stage = self.lay.stage(*src)
        if src[0] == self.rank:
            return self.local.pop((kind, from_stage, mb))
        import time

        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        t0 = time.perf_counter()
        dist.irecv(buf, src=self.global_rank[src[0]], group=self.group,
                   tag=self._tag(kind, from_stage, direction, mb)).wait()
        self.recv_wait += time.perf_counter() - t0
        return buf

    def _send(self, kind: str, chunk: int, mb: int, tensor: torch.Tensor) -> None:
        prev, nxt = neighbours(self.lay, self.rank, chunk)
        dst = nxt if kind == "F" else prev
        if dst is None:
            return
        stage = self.lay.stage(self.rank, chunk)
        if dst[0] == self.rank:
            self.local[(kind, stage, mb)] = tensor.detach()
            return
        t = tensor.detach().contiguous()
        self.sends.append((dist.isend(t, dst=self.global_rank[dst[0]], group=self.group,
                                      tag=self._tag(kind, stage, self._direction(chunk), mb)), t))

    # -- compute -----------------------------------------------------------------------------------
    def _is_last(self, chunk: int) -> bool:
        return neighbours(self.lay, self.rank, chunk)[1] is None

    def forward(self, chunk: int, mb: int) -> None:
        from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

        x = self._recv("F", chunk, mb)
        if x is not None and not self.forward_only:
            x.requires_grad_()
        model = self.model[chunk]
        model.set_input_tensor(x)
        with torch.set_grad_enabled(not self.forward_only):
            output, loss_func = self.forward_step_func(self.data[chunk], model)
        last = self._is_last(chunk)
        # on every stage, as Megatron's schedules do: it also sets the MoE aux-loss and MTP loss
        # gradient scales (1 / micro-batches) that this chunk's backward will use
        store: List = []
        output, tokens = forward_step_calc_loss(
            model, output, loss_func, self.config, None, self.collect, self.n, store,
            cp_group_size=1, is_last_stage=last)
        if last:
            self.num_tokens += tokens
            if store:
                self.losses[(chunk, mb)] = store[0]
        else:
            self._send("F", chunk, mb, output)
        if not self.forward_only:
            self.inputs[(chunk, mb)] = x
            self.outputs[(chunk, mb)] = output

    def backward(self, chunk: int, mb: int, zb: bool) -> None:
        output = self.outputs.pop((chunk, mb))
        x = self.inputs.pop((chunk, mb))
        grad = None if self._is_last(chunk) else self._recv("B", chunk, mb)
        if grad is None and self.config.grad_scale_func is not None:
            output = self.config.grad_scale_func(output)
        with WeightGradStore.deferring(zb):
            torch.autograd.backward(output, grad_tensors=grad)
        if zb:
            WeightGradStore.flush()
        if x is not None:
            self._send("B", chunk, mb, x.grad)

    def _run_forward(self, chunk: int, mb: int, pair: bool) -> None:
        from megatron_dsv3.pipeline.overlap import FORWARD_LANE, StepTrace

        with dispatch_lane(FORWARD_LANE), StepTrace.op("F", chunk, mb, FORWARD_LANE, pair):
            self.forward(chunk, mb)

    def _run_backward(self, chunk: int, mb: int, zb: bool, pair: bool) -> None:
        from megatron_dsv3.pipeline.overlap import BACKWARD_LANE, StepTrace

        with dispatch_lane(BACKWARD_LANE), StepTrace.op("B", chunk, mb, BACKWARD_LANE, pair):
            self.backward(chunk, mb, zb)

    def run(self, ops: List[Op]) -> None:
        import time

        start = time.perf_counter()
        for op in ops:
            if op.kind == "F":
                self._run_forward(op.chunk, op.mb, False)
            elif op.kind == "B":
                self._run_backward(op.chunk, op.mb, op.zb, False)
            elif op.kind == "W":
                WeightGradStore.pop()
            elif op.kind == "FB":
                overlapped_forward_backward(
                    lambda: self._run_forward(op.chunk, op.mb, True),
                    lambda: self._run_backward(op.chunk2, op.mb2, False, True))
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()
        wall = time.perf_counter() - start
        LAST_STEP_STATS.update(wall_s=wall, recv_wait_s=self.recv_wait,
                               bubble_fraction=self.recv_wait / wall if wall > 0 else 0.0)


def _forward_backward(schedule: str, *, forward_step_func, data_iterator, model, num_microbatches,
                      seq_length, micro_batch_size, decoder_seq_length=None, forward_only=False,
                      collect_non_loss_data=False, first_val_step=None,
                      adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None,
                      force_all_reduce=False):
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    if not isinstance(model, list) or len(model) != 2:
        raise ValueError(f"{schedule} needs this rank's two model chunks as a list "
                         f"(model=[chunk0, chunk1]); got {type(model).__name__}")
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
    runner = _Runner(lay, rank, model, forward_step_func, data_iterator, per_direction, shape,
                     dtype, config, group, forward_only, collect_non_loss_data)
    runner.n = num_microbatches  # losses are averaged over every micro-batch of the step
    if forward_only:
        ops = [Op("F", c, m) for m in range(per_direction) for c in (0, 1)]
    else:
        ops = build(schedule, ranks, num_microbatches)[rank]
    WeightGradStore.clear()
    runner.run(ops)
    if not forward_only:
        if schedule == "dualpipe":
            sync_mirrored_grads(model, group)
        if config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func(
                model, runner.num_tokens if config.calculate_per_token_loss else None)
    return [runner.losses[k] for k in sorted(runner.losses)]


def _flat_grads(chunk) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in chunk.parameters() if p.requires_grad])


def _add_flat(chunk, flat: torch.Tensor) -> None:
    offset = 0
    for p in chunk.parameters():
        if not p.requires_grad:
            continue
        g = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        offset += p.numel()


def sync_mirrored_grads(model: List, group) -> None:
    """DualPipe keeps every stage twice: rank r's chunk 0 (stage r) is rank P-1-r's chunk 1,
    and rank r's chunk 1 is rank P-1-r's chunk 0. Each rank sends both chunks' gradients to its
    mirror and adds what it receives, so both copies take the same optimizer step."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    peer = dist.get_process_group_ranks(group)[ranks - 1 - rank]
    mine = [_flat_grads(model[0]), _flat_grads(model[1])]
    into = [torch.empty_like(mine[0]), torch.empty_like(mine[1])]
    # tag c: "the sender's chunk c", which the receiver adds to its chunk 1 - c
    ops = [dist.P2POp(dist.isend, mine[0], peer, group, tag=0),
           dist.P2POp(dist.isend, mine[1], peer, group, tag=1),
           dist.P2POp(dist.irecv, into[1], peer, group, tag=0),
           dist.P2POp(dist.irecv, into[0], peer, group, tag=1)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    _add_flat(model[0], into[0])
    _add_flat(model[1], into[1])


def forward_backward_dualpipev(**kwargs):
    """Megatron's forward_backward_pipelining_without_interleaving signature; `model` is this
    rank's [chunk for stage r, chunk for stage 2P-1-r] and `data_iterator` one iterator per chunk
    (rank 0's two chunks both read the batch: tokens for the embedding, labels for the loss)."""
    return _forward_backward("dualpipev", **kwargs)


def forward_backward_dualpipe(**kwargs):
    """As forward_backward_dualpipev for DualPipe: `model` = [stage r (direction 0), stage P-1-r
    (direction 1)], half of the micro-batches per direction; the mirrored copies' gradients are
    summed before finalize_model_grads_func."""
    return _forward_backward("dualpipe", **kwargs)
