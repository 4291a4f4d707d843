"""Zero-bubble W deferral under Megatron's DistributedDataParallel: the deferred weight gradients
reach DDP's gradient buffers (main_grad) through DDP's own hooks, with and without
overlap_grad_reduce, and what DDP reduces equals what it reduces when nothing is deferred."""

import dataclasses

import pytest
import torch

from megatron_dsv3.testing.distributed import run_distributed
from megatron_dsv3.testing.pipeline_checks import random_lm_batches

B, S, N = 2, 16, 4  # micro-batch size, sequence length, micro-batches per step
STEPS = 2  # the second step runs DDP's overlap path with the first step's readiness counts


def _config():
    from megatron_dsv3.configs import get_config

    return get_config("deepseek-v3-tiny", num_layers=2, first_k_dense_replace=1,
                      mtp_num_layers=None)


def _batches(rank, step):
    return random_lm_batches(N, B, S, seed=100 * rank + step)  # each data-parallel rank its own


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]

    def loss_func(per_token):
        total = (per_token.float() * mask).sum()
        return total, mask.sum().to(torch.int), {"lm loss": total.detach().clone()}

    return out, loss_func


def _undeferred(build):
    """The same schedule with every weight gradient computed in its B (no zb, no W)."""
    def without_deferral(*args, **kwargs):
        return [[dataclasses.replace(op, zb=False) for op in ops if op.kind != "W"]
                for ops in build(*args, **kwargs)]
    return without_deferral


def _train(rank, world, overlap_grad_reduce, defer):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import executor, forward_backward_dualpipev
    from megatron_dsv3.testing.megatron_cpu import megatron_ddp_on_cpu

    if not defer:
        executor.build = _undeferred(executor.build)
    deferred = sum(op.kind == "W" for op in executor.build("dualpipev", 1, N)[0])
    config = _config()
    chunks = build_model_chunks(config, "dualpipev", 0, 1)
    # small buckets: several reductions, each started once its last gradient is in
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=overlap_grad_reduce,
                                               bucket_size=20_000 if overlap_grad_reduce else None)
    steps = []
    # the whole step on the CPU view: from megatron-core 0.19 DDP's gradient reduction (in its
    # hooks and finish_grad_sync) also asks torch.cuda for the current stream
    with megatron_ddp_on_cpu():
        model = [DistributedDataParallel(config, dataclasses.replace(ddp_config), module=c)
                 for c in chunks]
        for step in range(STEPS):
            for m in model:
                m.zero_grad_buffer()
            batches = _batches(rank, step)
            forward_backward_dualpipev(forward_step_func=forward_step,
                                       data_iterator=[iter(batches), iter(batches)], model=model,
                                       num_microbatches=N, seq_length=S, micro_batch_size=B)
            for m in model:
                m.finish_grad_sync()
            steps.append({f"{c}.{name}": p.main_grad.clone() for c, m in enumerate(model)
                          for name, p in m.module.named_parameters()})
            assert all(p.grad is None for m in model for p in m.module.parameters())
    return deferred, steps


@pytest.mark.parametrize("overlap_grad_reduce", [False, True])
def test_ddp_reduces_deferred_weight_gradients_like_undeferred_ones(overlap_grad_reduce):
    parallel = {"pipeline_model_parallel_size": 1}
    deferred = run_distributed(_train, 2, args=(overlap_grad_reduce, True),
                               megatron_parallel=parallel)
    reference = run_distributed(_train, 2, args=(overlap_grad_reduce, False),
                                megatron_parallel=parallel)
    assert deferred[0][0] > 0 and reference[0][0] == 0  # W ops ran in one run only
    linear_weights = 0
    for (_, got_steps), (_, want_steps) in zip(deferred, reference):
        for got, want in zip(got_steps, want_steps):
            assert set(got) == set(want)
            for name, g in got.items():
                torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=name)
                assert g.abs().sum() > 0 or want[name].abs().sum() == 0, name
            linear_weights += sum("linear" in n and n.endswith("weight") for n in got)
    assert linear_weights > 0
    # reduced over the data-parallel group: both ranks hold the same (averaged) gradients of
    # different data
    for a, b in zip(deferred[0][1], deferred[1][1]):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
