"""Time-dilated pipeline benchmark: stages that sleep for fixed forward/backward times, real
tensors over gloo, so P ranks do not compete for the machine's cores. Every rank sleeps with a
1 ns timer slack (`precise_sleeps`), so sleeps overrun by the machine's wake-up latency only.

    python bench/pipeline_timedilated.py [--pp 4 8] [--F 0.04 --B 0.08 --W 0.04] [--json]
    python bench/pipeline_timedilated.py --dualpipe-ref /path/to/DualPipe --pp 4 \
        --microbatches 16 32 --F 0.02 --B 0.04 --W 0.02 [--repeat 3]

Per pipeline size P, same total work per rank (P stages of F/B per micro-batch; DualPipeV: 2P
stages of half that), N = 4P micro-batches, measured iteration time and bubble (iteration time
minus the rank's own compute time, the worst rank) for: Megatron's 1F1B (megatron-core's own
schedule, run on CPU through megatron_dsv3.testing.megatron_cpu), torch.distributed.pipelining's
ScheduleDualPipeV, and ours (megatron_dsv3.pipeline.forward_backward_dualpipev), set against
DeepSeek's formulas. F&B pairs run sequentially here (F&B = F + B): no communication to hide.

With --dualpipe-ref DIR (a checkout of github.com/deepseek-ai/DualPipe) it instead sets our
DualPipeV and DualPipe against DeepSeek's reference implementations in the same harness: every
chunk sleeps F/B/W (weight gradients deferred to each implementation's own WeightGradStore), N
micro-batches as given. The reference is imported from DIR and adapted to CPU/gloo at run time
(its p2p buffers are allocated on the CPU and its device check sees the CPU); nothing of it is
copied here. Both sides do the same work: after the reference's DualPipe step, its caller sums
the mirrored copies' gradients (which the reference leaves to the caller and ours does inside
its step) with the exchange ours runs. Each configuration runs --repeat times per side, the two
sides' runs interleaved; the table reports the median and the smallest bubble of each side and
the median ratio of the runs made side by side, and a second table splits the median run's bubble (worst rank) into
the harness oversleeping, the waits for transfers (ours: its receives; the reference: the works
it waits on before each op, its receives and its previous op's sends) and the rest, host time.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dsv3.cli import (non_negative_float, non_negative_int, positive_float,  # noqa: E402
                              positive_int)  # noqa: E402
from megatron_dsv3.core.gemm import WeightGradStore  # noqa: E402
from megatron_dsv3.testing.distributed import run_distributed  # noqa: E402

S, MB, H = 4, 1, 16


def precise_sleeps():
    """Ask Linux for this process's sleeps to end on time: its default timer slack (50 us)
    lets every `time.sleep` overrun by that much on top of the wake-up latency, ~100 sleeps per
    rank and step here, the same on both sides of a comparison (it adds to every bubble alike
    and pulls ratios between them towards 1). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK: 1 ns


def _sleep(t, busy):
    """Sleep t seconds of "compute": busy[0] counts the asked time; busy[1], where the list has
    one, the time actually slept (an oversleep is the harness's, not the schedule's)."""
    start = time.perf_counter()
    time.sleep(t)
    busy[0] += t
    if len(busy) > 1:
        busy[1] += time.perf_counter() - start


class SleepFn(torch.autograd.Function):
    """Forward sleeps f; backward sleeps b - w for the input gradient and w for the weight
    gradient (deferred to the weight-gradient store `store` when it is deferring: ours, or
    DeepSeek's reference's class); the first stage, which has no input gradient, sleeps the
    whole b in its one backward call."""

    @staticmethod
    def forward(ctx, x, weight, f, b, w, busy, store):
        _sleep(f, busy)
        ctx.b, ctx.w, ctx.busy, ctx.first, ctx.store = b, w, busy, not x.requires_grad, store
        return x.clone()  # (a new tensor: one cold op after the sleep, not three)

    @staticmethod
    def backward(ctx, g):
        busy, b, w, store = ctx.busy, ctx.b, ctx.w, ctx.store
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if store.enabled if store is not None else WeightGradStore.is_deferring():
            _sleep(b - w, busy)

            def weight():
                _sleep(w, busy)
            (store or WeightGradStore).put(weight)
            return g, None, None, None, None, None, None
        if ctx.first:  # the first stage has no input gradient: one call does the whole backward
            t = b
        else:  # torch's zero-bubble split calls input and weight gradients separately
            t = (b - w if need_x else 0) + (w if need_w else 0)
        _sleep(t, busy)
        return ((g if need_x else None), (torch.zeros(1) if need_w else None),
                None, None, None, None, None)


class SleepStage(torch.nn.Module):
    """`store`: DeepSeek's reference WeightGradStore class for its schedules (None: ours)."""

    def __init__(self, f, b, w, busy, config=None, store=None):
        super().__init__()
        from megatron.core.transformer.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.f, self.b, self.w, self.busy, self.config, self.store = f, b, w, busy, config, store
        self.input = None

    def set_input_tensor(self, t):
        self.input = t[0] if isinstance(t, list) else t

    def forward(self, x=None):
        inp = self.input if self.input is not None else x
        return SleepFn.apply(inp, self.weight, self.f, self.b, self.w, self.busy, self.store)


def _config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1,
                             pipeline_dtype=torch.float32, params_dtype=torch.float32)


def _forward_step(data_iterator, model):
    x = next(data_iterator)

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return model(x), loss_func


def _load_reference(path):
    """DeepSeek's `dualpipe` package from the checkout at `path`, adapted to CPU/gloo: its p2p
    receive buffers are allocated on the CPU (the package allocates them on "cuda")."""
    if not os.path.isfile(os.path.join(path, "dualpipe", "dualpipev.py")):
        raise SystemExit(f"--dualpipe-ref {path}: no dualpipe/dualpipev.py there (expected a "
                         f"checkout of github.com/deepseek-ai/DualPipe)")
    sys.path.insert(0, path)
    import dualpipe
    import dualpipe.comm as comm

    comm.build_from_tensor_shapes = lambda: [
        torch.empty(s, dtype=comm.TENSOR_DTYPE, requires_grad=True) for s in comm.TENSOR_SHAPES]
    return dualpipe


def _run_reference(rank, world, which, F, B, W, N, path):
    import torch.distributed as dist

    from megatron_dsv3.pipeline.executor import sync_mirrored_grads

    torch.set_num_threads(1)
    precise_sleeps()
    ref = _load_reference(path)
    from dualpipe.utils import WeightGradStore

    busy = [0.0, 0.0]
    ref.set_p2p_tensor_shapes([(S, MB, H)])
    ref.set_p2p_tensor_dtype(torch.float32)
    mods = (SleepStage(F, B, W, busy, store=WeightGradStore),
            SleepStage(F, B, W, busy, store=WeightGradStore))
    cuda_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # the constructor's "parameters on this GPU" check
    try:
        pipe = (ref.DualPipeV if which == "ref_dualpipev" else ref.DualPipe)(mods, batch_dim=1)
    finally:
        torch.cuda.current_device = cuda_device
    # DualPipeV: rank 0 feeds all N micro-batches; DualPipe: ranks 0 and P-1 feed N/2 each
    feeds = rank == 0 if which == "ref_dualpipev" else rank in (0, world - 1)
    per_feeder = N if which == "ref_dualpipev" else N // 2
    x, labels = torch.ones(S, per_feeder * MB, H), torch.zeros(S, per_feeder * MB, H)

    def step():
        if feeds:
            pipe.step(x, num_chunks=N, criterion=lambda out, lab: out.float().mean(),
                      labels=[labels])
        else:
            pipe.step(num_chunks=N)
        if which == "ref_dualpipe":
            # equal work: DualPipe holds every stage twice and both copies must take the same
            # optimizer step; the reference's step leaves summing the copies' gradients to its
            # caller (its example does it after step), ours does it inside its step. Here the
            # reference's caller sums them with the exchange ours runs (its waits are not the
            # schedule's: left out of the transfer waits, as ours are)
            waits = stats["recv_wait_s"]
            sync_mirrored_grads(list(mods), dist.group.WORLD)
            stats["recv_wait_s"] = waits
    stats = {"recv_wait_s": 0.0}
    _time_waits(stats)
    return _timed_iteration(step, busy, stats)


class _TimedWork:
    """A transfer's work whose wait() adds its time to stats["recv_wait_s"]."""

    def __init__(self, work, stats):
        self.work, self.stats = work, stats

    def wait(self, *args):
        t0 = time.perf_counter()
        try:
            return self.work.wait(*args)
        finally:
            self.stats["recv_wait_s"] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.work, name)


def _time_waits(stats):
    """In a reference rank's process: the works torch.distributed.batch_isend_irecv returns (the
    reference waits on them, its receives and its previous op's sends, before each op) time
    their waits into `stats`, as our executor's `stats=` does for its receives."""
    import torch.distributed as dist

    batch = dist.batch_isend_irecv
    dist.batch_isend_irecv = lambda ops: [_TimedWork(w, stats) for w in batch(ops)]


def _timed_iteration(step, busy, stats=None):
    """One untimed iteration (first-call imports and allocations), then the timed one: -> (its
    wall time until every rank is done, this rank's compute time in it, what else is known of
    it: the time the harness actually slept, and for ours the time spent waiting on receives)."""
    import torch.distributed as dist

    step()
    dist.barrier()
    busy[:] = [0.0] * len(busy)
    if stats is not None:
        stats["recv_wait_s"] = 0.0
    start = time.perf_counter()
    step()
    dist.barrier()
    extra = {"slept_s": busy[1] if len(busy) > 1 else None,
             "recv_wait_s": stats.get("recv_wait_s") if stats else None}
    return time.perf_counter() - start, busy[0], extra


def _run(rank, world, which, F, B, W, N, scale=0.5, recv_lookahead=2, p2p_order="tagged"):
    import torch.distributed as dist

    torch.set_num_threads(1)
    precise_sleeps()
    busy = [0.0, 0.0]
    stats = {}  # ours: the executor's time waiting on receives (its `stats=`)
    data = [torch.ones(S, MB, H) for _ in range(N)]
    if which == "megatron_1f1b":
        from megatron.core.pipeline_parallel.schedules import (
            forward_backward_pipelining_without_interleaving as fb)

        from megatron_dsv3.testing.megatron_cpu import megatron_schedules_on_cpu

        model = SleepStage(F, B, W, busy, _config())

        def step():
            with megatron_schedules_on_cpu():
                fb(forward_step_func=_forward_step, data_iterator=iter(data), model=[model],
                   num_microbatches=N, seq_length=S, micro_batch_size=MB)
    elif which in ("ours_dualpipev", "ours_dualpipe"):
        from megatron_dsv3.pipeline import forward_backward_dualpipe, forward_backward_dualpipev

        fb = forward_backward_dualpipev if which == "ours_dualpipev" else forward_backward_dualpipe
        chunks = [SleepStage(F * scale, B * scale, W * scale, busy, _config()) for _ in range(2)]

        def step():
            fb(forward_step_func=_forward_step, data_iterator=[iter(data), iter(data)],
               model=chunks, num_microbatches=N, seq_length=S, micro_batch_size=MB,
               p2p_order=p2p_order, stats=stats,
               recv_lookahead=recv_lookahead if p2p_order == "tagged" else None)
    else:  # torch.distributed.pipelining's DualPipeV
        from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

        group = dist.group.WORLD
        mods = [SleepStage(F / 2, B / 2, W / 2, busy) for _ in range(2)]
        stages = [PipelineStage(mods[0], rank, 2 * world, torch.device("cpu"), group=group),
                  PipelineStage(mods[1], 2 * world - 1 - rank, 2 * world, torch.device("cpu"),
                                group=group)]
        sched = ScheduleDualPipeV(stages, n_microbatches=N,
                                  loss_fn=lambda out, target: out.float().mean())
        x = torch.ones(S * N, MB, H)

        def step():
            if rank == 0:
                sched.step(x, target=torch.zeros(S * N, MB, H))
            else:
                sched.step()
    return _timed_iteration(step, busy, stats)


def refuse_w_above_b(parser, a):
    """The weight gradient is part of the backward: --W above --B is a usage error."""
    if a.W > a.B:
        parser.error(f"--W {a.W} is invalid: allowed values are 0 <= W <= --B {a.B} "
                     "(W is part of B)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pp", type=positive_int, nargs="+", default=[4, 8])
    p.add_argument("--F", type=positive_float, default=0.04)
    p.add_argument("--B", type=positive_float, default=0.08)
    p.add_argument("--W", type=non_negative_float, default=0.04)
    p.add_argument("--microbatches", type=positive_int, nargs="+", default=None,
                   help="micro-batch counts (with --dualpipe-ref; default: 4P)")
    p.add_argument("--dualpipe-ref", metavar="DIR", default=None,
                   help="a checkout of github.com/deepseek-ai/DualPipe: compare our DualPipeV and "
                        "DualPipe with DeepSeek's reference (each chunk sleeps F/B/W)")
    p.add_argument("--recv-lookahead", type=non_negative_int, default=2,
                   help="our executor's recv_lookahead (ops ahead whose receives are posted)")
    p.add_argument("--p2p-order", choices=["tagged", "ordered"], default="tagged",
                   help="our executor's transfer order: tagged (gloo's default, receives posted "
                        "ahead) or ordered (DeepSeek's order in batches, NCCL's default)")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="runs per configuration (the table reports the median)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    refuse_w_above_b(p, a)
    if a.dualpipe_ref is not None:
        return _compare_with_reference(a)
    ignored = [f for f, d in (("--microbatches", None), ("--recv-lookahead", 2),
                              ("--p2p-order", "tagged"), ("--repeat", 1))
               if getattr(a, f[2:].replace("-", "_")) != d]
    if ignored:  # (the comparison without a reference runs 4P micro-batches once, as it did)
        p.error(f"{', '.join(ignored)} apply to the comparison with --dualpipe-ref only")
    from megatron_dsv3.pipeline.simulate import Times, expected_bubble

    rows = []
    for P in a.pp:
        N = 4 * P
        formulas = {"megatron_1f1b": expected_bubble("1f1b", P, Times(a.F, a.B, a.W, a.F + a.B)),
                    # 2P stages of half the work; F&B pairs sequential: F&B = (F + B) / 2
                    "ours_dualpipev": expected_bubble("dualpipev", P, Times(
                        a.F / 2, a.B / 2, a.W / 2, (a.F + a.B) / 2)),
                    "torch_dualpipev": expected_bubble("dualpipev", P, Times(
                        a.F / 2, a.B / 2, a.W / 2, (a.F + a.B) / 2))}
        for which in ("megatron_1f1b", "torch_dualpipev", "ours_dualpipev"):
            try:
                res = run_distributed(_run, P, args=(which, a.F, a.B, a.W, N),
                                      megatron_parallel={"pipeline_model_parallel_size": P},
                                      timeout=600)
                total = max(t for t, *_ in res)
                bubble = max(t - b for t, b, *_ in res)
                rows.append({"pp": P, "microbatches": N, "schedule": which, "iteration_s": total,
                             "bubble_s": bubble, "formula_bubble_s": formulas[which],
                             "ideal_s": N * (a.F + a.B)})
            except Exception as e:  # recorded, not hidden
                rows.append({"pp": P, "microbatches": N, "schedule": which,
                             "error": str(e).splitlines()[-1][:300]})
            print(json.dumps(rows[-1]), flush=True)
    if not a.json:
        print("| P | N | schedule | iteration (s) | bubble (s) | formula bubble (s) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['pp']} | {r['microbatches']} | {r['schedule']} | error: {r['error']} | | |")
            else:
                print(f"| {r['pp']} | {r['microbatches']} | {r['schedule']} | {r['iteration_s']:.3f} | "
                      f"{r['bubble_s']:.3f} | {r['formula_bubble_s']:.3f} |")


def _breakdown(res):
    """The worst rank's bubble of one run, in ms, split into what is known of it: the harness
    oversleeping, waiting for transfers (module docstring), and the rest (host time between and
    inside operations)."""
    t, b, extra = max(res, key=lambda r: r[0] - r[1])
    out = {"bubble_ms": (t - b) * 1e3, "sleep_overshoot_ms": (extra["slept_s"] - b) * 1e3,
           "recv_wait_ms": None if extra["recv_wait_s"] is None else extra["recv_wait_s"] * 1e3}
    out["other_ms"] = out["bubble_ms"] - out["sleep_overshoot_ms"] - (out["recv_wait_ms"] or 0.0)
    return out


def _measure_pair(ours, ref, P, repeat):
    """`repeat` runs of each side, interleaved (ours, reference, reference, ours, ...: the
    machine's speed drifts by tens of percent over minutes on shared cores, and a block of
    runs per side would hand the drift to one of them). Per run: the worst rank's iteration
    time and iteration time minus own compute. -> per side (median iteration time, median
    bubble, smallest bubble: noise only adds time, so the smallest is the least disturbed
    estimate, the median run's `_breakdown`), and the median over runs of ours / reference of
    the runs made side by side."""
    import statistics

    runs = {"ours": [], "ref": []}
    for i in range(repeat):
        for side in (("ours", "ref") if i % 2 == 0 else ("ref", "ours")):
            fn, args, parallel = {"ours": ours, "ref": ref}[side]
            res = run_distributed(fn, P, args=args, megatron_parallel=parallel, timeout=600)
            runs[side].append((max(t for t, *_ in res), max(t - b for t, b, *_ in res),
                               _breakdown(res)))

    def summary(r):
        median_run = sorted(r, key=lambda x: x[1])[(len(r) - 1) // 2]
        return (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r),
                min(x[1] for x in r), median_run[2])
    paired = statistics.median(o[1] / r[1] for o, r in zip(runs["ours"], runs["ref"]))
    return summary(runs["ours"]), summary(runs["ref"]), paired


def _compare_with_reference(a):
    from megatron_dsv3.pipeline.simulate import Times, expected_bubble

    _load_reference(os.path.abspath(a.dualpipe_ref))  # fail early on a wrong path
    rows = []
    for P in a.pp:
        for N in a.microbatches or [4 * P]:
            times = Times(a.F, a.B, a.W, a.F + a.B)
            for sched in ("dualpipev", "dualpipe"):
                row = {"pp": P, "microbatches": N, "schedule": sched,
                       "formula_bubble_s": expected_bubble(sched, P, times)}
                ours, ref, paired = _measure_pair(
                    (_run, (f"ours_{sched}", a.F, a.B, a.W, N, 1.0, a.recv_lookahead,
                            a.p2p_order), {"pipeline_model_parallel_size": P}),
                    (_run_reference, (f"ref_{sched}", a.F, a.B, a.W, N,
                                      os.path.abspath(a.dualpipe_ref)), None), P, a.repeat)
                row.update({"ours_iteration_s": ours[0], "ours_bubble_s": ours[1],
                            "ours_min_bubble_s": ours[2],
                            "ref_iteration_s": ref[0], "ref_bubble_s": ref[1],
                            "ref_min_bubble_s": ref[2],
                            "bubble_ratio_ours_over_ref": ours[1] / ref[1],
                            "min_bubble_ratio_ours_over_ref": ours[2] / ref[2],
                            "paired_bubble_ratio_median": paired,
                            "ours_breakdown_ms": ours[3], "ref_breakdown_ms": ref[3]})
                rows.append(row)
                print(json.dumps(row), flush=True)
    if not a.json:
        print("| P | N | schedule | ours iteration (s) | reference iteration (s) | ours bubble (s) "
              "| reference bubble (s) | ours / reference bubble | smallest bubble ours / "
              "reference (s) | ratio of smallest | median ratio of side-by-side runs | "
              "formula bubble (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['pp']} | {r['microbatches']} | {r['schedule']} | "
                  f"{r['ours_iteration_s']:.3f} | {r['ref_iteration_s']:.3f} | "
                  f"{r['ours_bubble_s']:.3f} | {r['ref_bubble_s']:.3f} | "
                  f"**{r['bubble_ratio_ours_over_ref']:.2f}** | "
                  f"{r['ours_min_bubble_s']:.3f} / {r['ref_min_bubble_s']:.3f} | "
                  f"**{r['min_bubble_ratio_ours_over_ref']:.2f}** | "
                  f"**{r['paired_bubble_ratio_median']:.2f}** | {r['formula_bubble_s']:.3f} |")
        print("\nThe median run's worst-rank bubble (ms) = the harness oversleeping + waits "
              "for transfers + the rest (host time):\n")
        print("| P | N | schedule | side | bubble | sleep overshoot | transfer waits | rest |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            for side in ("ours", "ref"):
                d = r[f"{side}_breakdown_ms"]
                waits = "-" if d["recv_wait_ms"] is None else f"{d['recv_wait_ms']:.1f}"
                print(f"| {r['pp']} | {r['microbatches']} | {r['schedule']} | {side} | "
                      f"{d['bubble_ms']:.1f} | {d['sleep_overshoot_ms']:.1f} | {waits} | "
                      f"{d['other_ms']:.1f} |")


if __name__ == "__main__":
    main()
