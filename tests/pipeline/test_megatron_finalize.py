"""DualPipe and DualPipeV the way Megatron-LM's pretrain() runs them: chunks wrapped in Megatron's
DistributedDataParallel, megatron-core's finalize_model_grads after the step (gradient reduction,
the aux-loss-free bias update, the 1 / tokens scale of --calculate-per-token-loss). Against the
unpipelined model on the same micro-batches, whose loss masks keep different numbers of tokens:
every gradient (DDP's main_grad, the two copies of a DualPipe stage alike), every router bias
after its update, and Megatron's gradient norm (each stage counted once)."""

import pytest
import torch

from megatron_dsv3.testing.distributed import run_distributed
from megatron_dsv3.testing.pipeline_checks import global_name, random_lm_batches

B, S, N, PP = 2, 16, 4, 2  # micro-batch size, sequence length, micro-batches per step, ranks


def _config(per_token):
    from megatron_dsv3.configs import get_config

    config = get_config("deepseek-v3-tiny", num_layers=4, first_k_dense_replace=1,
                        mtp_num_layers=None)
    config.calculate_per_token_loss = per_token
    return config


def _batches():
    """Loss masks that keep 15, 12, 9, 6 tokens of each row (and a few less in row 1)."""
    batches = random_lm_batches(N, B, S, seed=7)
    for i, b in enumerate(batches):
        b["loss_mask"][:, S - 1 - 3 * i:] = 0
        b["loss_mask"][1, : i % 3] = 0
    return batches


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                loss_mask=batch["loss_mask"])
    mask = batch["loss_mask"]

    def loss_func(per_token):
        total = (per_token.float() * mask).sum()
        return total, mask.sum().to(torch.int), {"lm loss": total.detach().clone()}

    return out, loss_func


def _pipelined(rank, world, schedule, per_token, overlap_grad_reduce=False):
    from megatron.core import parallel_state
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.transformer.module import param_is_not_shared

    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import get_forward_backward_func
    from megatron_dsv3.testing.megatron_cpu import megatron_ddp_on_cpu

    config = _config(per_token)
    chunks = build_model_chunks(config, schedule, rank, world)
    batches = _batches()
    iters = ([iter(batches), iter(batches)] if schedule == "dualpipev"
             else [iter(batches[: N // 2]), iter(batches[N // 2:])])
    with megatron_ddp_on_cpu():
        ddp = DistributedDataParallelConfig(overlap_grad_reduce=overlap_grad_reduce,
                                            bucket_size=20_000 if overlap_grad_reduce else None)
        model = [DistributedDataParallel(config, ddp, module=c) for c in chunks]
        config.finalize_model_grads_func = finalize_model_grads
        get_forward_backward_func(schedule)(
            forward_step_func=forward_step, data_iterator=iters, model=model,
            num_microbatches=N, seq_length=S, micro_batch_size=B)
    grads, biases = {}, {}
    for c in chunks:
        for name, p in c.named_parameters():
            grads[global_name(c, name)] = p.main_grad.clone()
        for name, b in c.named_buffers():
            if name.endswith("expert_bias"):
                biases[global_name(c, name)] = b.clone()
    # Megatron's gradient norm: the parameters not marked shared, summed over the pipeline
    norm_sq = sum(float((p.main_grad.float() ** 2).sum()) for c in chunks
                  for p in c.parameters() if param_is_not_shared(p))
    total = torch.tensor([norm_sq], dtype=torch.float64)
    torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return grads, biases, float(total.sqrt())


def _reference(per_token):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balancing import routers_of, updated_expert_bias

    config = _config(per_token)
    model = build_model(config)
    # Megatron: per-token losses are sums (aux loss scale 1), the step divides by all tokens;
    # otherwise each micro-batch's mean over its tokens, divided by the micro-batches
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 if per_token else 1.0 / N))
    tokens = 0
    for b in _batches():
        per = model(b["tokens"], b["position_ids"], None, labels=b["labels"],
                    loss_mask=b["loss_mask"])
        total = (per.float() * b["loss_mask"]).sum()
        tokens += int(b["loss_mask"].sum())
        (total if per_token else total / b["loss_mask"].sum() / N).backward()
    scale = 1.0 / tokens if per_token else 1.0
    grads = {n: p.grad * scale for n, p in model.named_parameters()}
    biases = {}
    for name, m in model.named_modules():
        if m in set(routers_of([model])):
            biases[name + ".expert_bias"] = updated_expert_bias(
                m.local_tokens_per_expert, m.expert_bias, config.moe_router_bias_update_rate)
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    return grads, biases, norm


# overlap_grad_reduce: DDP's reduction runs during backward (in buckets, as gradients complete)
# and writes main_grad up to finalize; DualPipe sums its two copies of a stage after it
@pytest.mark.parametrize("schedule,per_token,overlap_grad_reduce",
                         [("dualpipev", False, False), ("dualpipev", True, False),
                          ("dualpipe", False, False), ("dualpipe", True, False),
                          ("dualpipe", False, True)])
def test_finalized_gradients_biases_and_norm_equal_unpipelined(single_rank_world, schedule,
                                                                per_token, overlap_grad_reduce):
    ref_grads, ref_biases, ref_norm = _reference(per_token)
    results = run_distributed(_pipelined, PP, args=(schedule, per_token, overlap_grad_reduce),
                              megatron_parallel={"pipeline_model_parallel_size": PP})
    seen = set()
    for grads, biases, norm in results:
        for name, g in grads.items():
            rel = ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)).item()
            assert rel < 1e-5, (name, rel)
            seen.add(name)
        assert biases and set(biases) <= set(ref_biases)
        for name, b in biases.items():  # both copies of a DualPipe stage: the whole batch's step
            torch.testing.assert_close(b, ref_biases[name], rtol=0, atol=1e-7, msg=name)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
    assert seen == set(ref_grads)
    assert len({n for _, b, _ in results for n in b}) == len(ref_biases)


def _ramped(rank, world, overlap, counts, schedule):
    """Steps of `counts` micro-batches (--rampup-batch-size) with Megatron DDP, the sync
    functions Megatron-LM's loop sets with overlap_grad_reduce; -> per step (main_grad by global
    name, when each chunk's reduction started: before its step's last op or not)."""
    import dataclasses as dc

    from megatron.core import parallel_state
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)

    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import executor, get_forward_backward_func
    from megatron_dsv3.testing.megatron_cpu import megatron_ddp_on_cpu

    config = _config(False)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = build_model_chunks(config, schedule, pp_rank, pp)
    ddp = DistributedDataParallelConfig(overlap_grad_reduce=overlap,
                                        bucket_size=20_000 if overlap else None)
    started, ops_run = [], [0]
    run_op = executor._Runner._run_op

    def counting(self, op):
        run_op(self, op)
        ops_run[0] += 1
    executor._Runner._run_op = counting
    out = []
    with megatron_ddp_on_cpu():
        model = [DistributedDataParallel(config, dc.replace(ddp), module=c) for c in chunks]
        config.finalize_model_grads_func = finalize_model_grads
        if overlap:  # as megatron.training.training.train
            config.no_sync_func = [m.no_sync for m in model]
            config.grad_sync_func = [
                lambda params, m=m, c=c: (started.append((c, ops_run[0])), m.start_grad_sync())
                for c, m in enumerate(model)]
        dp = parallel_state.get_data_parallel_rank()
        for step, n in enumerate(counts):
            for m in model:
                m.zero_grad_buffer()
            started.clear()
            ops_run[0] = 0
            batches = random_lm_batches(n, B, S, seed=100 * dp + step)
            iters = ([iter(batches), iter(batches)] if schedule == "dualpipev"
                     else [iter(batches[: n // 2]), iter(batches[n // 2:])])
            get_forward_backward_func(schedule)(
                forward_step_func=forward_step, data_iterator=iters, model=model,
                num_microbatches=n, seq_length=S, micro_batch_size=B)
            grads = {global_name(c, name): p.main_grad.clone()
                     for c in chunks for name, p in c.named_parameters()}
            out.append((grads, sorted(started), ops_run[0]))
    return out


@pytest.mark.parametrize("schedule,pp,dp", [("dualpipev", 1, 2), ("dualpipe", 2, 2)])
def test_overlapped_gradient_reduction_with_a_micro_batch_count_that_changes(single_rank_world,
                                                                            schedule, pp, dp):
    """--rampup-batch-size with --overlap-grad-reduce: DDP marked each parameter ready once per
    micro-batch, started a bucket's reduction only at the first step's count, and finish_grad_sync
    failed at the first step of another count. With Megatron-LM's no_sync_func / grad_sync_func
    the gradients equal those without overlap at every count, and each chunk's reduction starts
    right after its last gradient op (here before the step's last op on every rank)."""
    counts = (2 * pp, 4 * pp, 2 * pp)
    parallel = {"pipeline_model_parallel_size": pp}
    ref = run_distributed(_ramped, pp * dp, args=(False, counts, schedule),
                          megatron_parallel=parallel)
    got = run_distributed(_ramped, pp * dp, args=(True, counts, schedule),
                          megatron_parallel=parallel)
    for rank, (r_steps, g_steps) in enumerate(zip(ref, got)):
        for (r, _, _), (g, started, ops) in zip(r_steps, g_steps):
            for name in r:
                torch.testing.assert_close(g[name], r[name], rtol=1e-6, atol=1e-9, msg=name)
            assert [c for c, _ in started] == [0, 1], (rank, started)
            assert min(at for _, at in started) < ops, (rank, started, ops)
