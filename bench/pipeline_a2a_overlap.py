"""Time-dilated pipeline benchmark with the MoE all-to-all inside each stage: does DualPipeV's
overlapped F&B pair hide it?

    python bench/pipeline_a2a_overlap.py [--pp 4] [--F 0.04 --B 0.08 --W 0.04 --A 0.01]

Each stage is attention -> dispatch -> experts -> combine: compute sleeps (F/2 before, F/2 after
the dispatch in the forward, B likewise in the backward, W deferred as the weight gradient) and
two real gloo all-to-alls over the stage's expert-parallel group (EP 2; world = 2P ranks), each
held in flight for A seconds of link time (the transfer is issued asynchronously; its wait
returns no earlier than A after the issue). DualPipeV stages hold half the layers: half the
compute and half the link time per transfer. Schedules: Megatron's 1F1B (its own code), ours
with F&B pairs one after the other, and ours with the pairs in two threads (forward all-to-alls
on lane 0, backward on lane 1; megatron_dsv3.lanes, megatron_dsv3.pipeline.overlap). Iteration
time is the slowest rank's, of a second iteration (the first is untimed, as in
pipeline_timedilated); compute is the sleeping time of the busiest rank; link time is what the
all-to-alls of one rank would cost if none were hidden.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dsv3.cli import non_negative_float, positive_float, positive_int  # noqa: E402
from megatron_dsv3.testing.distributed import run_distributed  # noqa: E402

from pipeline_timedilated import (MB, S, SleepFn, _config, _forward_step,  # noqa: E402
                                   _timed_iteration, precise_sleeps,  # noqa: E402
                                   refuse_w_above_b)  # noqa: E402

class DilatedAllToAll(torch.autograd.Function):
    """An equal-split all-to-all over the calling thread's lane of `lanes`, taking at least `link`
    seconds from issue to completion, in both passes."""

    @staticmethod
    def _transfer(x, lanes, link):
        import torch.distributed as dist

        from megatron_dsv3.dispatch.topology import resolve_group

        group = resolve_group(lanes)
        out = torch.empty_like(x)
        start = time.perf_counter()
        work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
        work.wait()
        left = link - (time.perf_counter() - start)
        if left > 0:
            time.sleep(left)
        return out

    @staticmethod
    def forward(ctx, x, lanes, link):
        ctx.lanes, ctx.link = lanes, link
        return DilatedAllToAll._transfer(x, lanes, link)

    @staticmethod
    def backward(ctx, g):
        return DilatedAllToAll._transfer(g, ctx.lanes, ctx.link), None, None


class MoEStage(torch.nn.Module):
    def __init__(self, f, b, w, link, lanes, busy, config):
        super().__init__()
        from megatron.core.transformer.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder
        self.w1 = torch.nn.Parameter(torch.zeros(1))
        self.w2 = torch.nn.Parameter(torch.zeros(1))
        self.f, self.b, self.w, self.link, self.lanes = f, b, w, link, lanes
        self.busy, self.config, self.input = busy, config, None

    def set_input_tensor(self, t):
        self.input = t[0] if isinstance(t, list) else t

    def forward(self, x=None):
        h = self.input if self.input is not None else x
        h = SleepFn.apply(h, self.w1, self.f / 2, self.b / 2, self.w / 2, self.busy, None)  # attention
        h = DilatedAllToAll.apply(h, self.lanes, self.link)  # dispatch
        h = SleepFn.apply(h, self.w2, self.f / 2, self.b / 2, self.w / 2, self.busy, None)  # experts
        return DilatedAllToAll.apply(h, self.lanes, self.link)  # combine


def _lanes():
    from megatron.core import parallel_state
    import torch.distributed as dist

    from megatron_dsv3.dispatch.topology import LaneGroups
    from megatron_dsv3.lanes import LANES

    ep = parallel_state.get_expert_model_parallel_group()
    ranks = dist.get_process_group_ranks(ep)
    return LaneGroups([ep] + [dist.new_group(ranks, use_local_synchronization=True)
                              for _ in range(LANES - 1)])


def _run(rank, world, which, F, B, W, A, N):
    from megatron_dsv3.pipeline.overlap import threaded_forward_backward

    torch.set_num_threads(1)
    precise_sleeps()
    busy = [0.0]
    lanes = _lanes()
    data = [torch.ones(S, MB, 16) for _ in range(N)]
    if which == "megatron_1f1b":
        from megatron.core.pipeline_parallel.schedules import (
            forward_backward_pipelining_without_interleaving as fb)

        from megatron_dsv3.testing.megatron_cpu import megatron_schedules_on_cpu

        model = MoEStage(F, B, W, A, lanes, busy, _config())

        def step():
            with megatron_schedules_on_cpu():
                fb(forward_step_func=_forward_step, data_iterator=iter(data), model=[model],
                   num_microbatches=N, seq_length=S, micro_batch_size=MB)
    else:
        from megatron_dsv3.pipeline import forward_backward_dualpipev

        overlap = threaded_forward_backward if which == "ours_dualpipev_overlapped" else None
        chunks = [MoEStage(F / 2, B / 2, W / 2, A / 2, lanes, busy, _config()) for _ in range(2)]

        def step():
            forward_backward_dualpipev(forward_step_func=_forward_step,
                                       data_iterator=[iter(data), iter(data)], model=chunks,
                                       num_microbatches=N, seq_length=S, micro_batch_size=MB,
                                       overlap=overlap)
    wall, compute, _ = _timed_iteration(step, busy)  # (an untimed iteration first)
    return wall, compute


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=positive_int, nargs="+", default=[4])
    p.add_argument("--F", type=positive_float, default=0.04)
    p.add_argument("--B", type=positive_float, default=0.08)
    p.add_argument("--W", type=non_negative_float, default=0.04)
    p.add_argument("--A", type=non_negative_float, default=0.02,
                   help="link time of one all-to-all (1F1B stage)")
    a = p.parse_args()
    refuse_w_above_b(p, a)
    rows = []
    for P in a.pp:
        N = 4 * P
        for which in ("megatron_1f1b", "ours_dualpipev_sequential", "ours_dualpipev_overlapped"):
            res = run_distributed(_run, 2 * P, args=(which, a.F, a.B, a.W, a.A, N),
                                  megatron_parallel={"pipeline_model_parallel_size": P,
                                                     "expert_model_parallel_size": 2},
                                  timeout=900)
            total = max(t for t, _ in res)
            rows.append({"pp": P, "ep": 2, "microbatches": N, "schedule": which,
                         "iteration_s": total, "compute_s": max(b for _, b in res),
                         "a2a_link_s_per_rank": N * 4 * a.A,
                         "ideal_no_a2a_s": N * (a.F + a.B)})
            print(json.dumps(rows[-1]), flush=True)
    print("| P | N | schedule | iteration (s) | compute per rank (s) | link time per rank (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pp']} | {r['microbatches']} | {r['schedule']} | {r['iteration_s']:.3f} | "
              f"{r['compute_s']:.3f} | {r['a2a_link_s_per_rank']:.3f} |")


if __name__ == "__main__":
    main()
