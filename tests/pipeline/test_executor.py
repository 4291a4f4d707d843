"""DualPipeV and DualPipe on gloo give the losses and gradients of the unpipelined model."""

import time

import pytest
import torch

from megatron_dsv3.testing.distributed import run_distributed
from megatron_dsv3.testing.pipeline_checks import grads_by_global_name, random_lm_batches

B, S = 2, 16  # micro-batch size, sequence length


def _batches(N):
    return random_lm_batches(N, B, S, seed=7)


def _config(mtp, layers):
    from megatron_dsv3.configs import get_config

    return get_config("deepseek-v3-tiny", num_layers=layers, first_k_dense_replace=1,
                      mtp_num_layers=1 if mtp else None)


def forward_step(data_iterator, model):
    from functools import partial

    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(mask, per_token):
        total = (per_token.float() * mask).sum()
        return total, mask.sum().to(torch.int), {"lm loss": total.detach().clone()}

    return out, partial(loss_func, batch["loss_mask"])


def _pipelined(rank, world, schedule, mtp, forward_only, N, layers, p2p_order=None,
               threaded=False, dealloc=False, grad_scale=None):
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import executor, get_forward_backward_func

    config = _config(mtp, layers)
    config.deallocate_pipeline_outputs = dealloc
    if grad_scale is not None:  # Megatron's loss scaler (mixed precision) scales the loss
        config.grad_scale_func = lambda loss: loss * grad_scale
    freed = []
    if dealloc:  # the bytes each sent output keeps after its forward
        forward = executor._Runner.forward

        def spy(self, chunk, mb):
            forward(self, chunk, mb)
            if (chunk, mb) in self.deallocated:
                freed.append(self.outputs[(chunk, mb)].untyped_storage().nbytes())
        executor._Runner.forward = spy
    chunks = build_model_chunks(config, schedule, rank, world)
    batches = _batches(N)
    if schedule == "dualpipev":
        iters = [iter(batches), iter(batches)]
    else:  # half the micro-batches enter at each end
        iters = [iter(batches[: N // 2]), iter(batches[N // 2:])]
    from megatron_dsv3.pipeline.overlap import threaded_forward_backward

    run = get_forward_backward_func(schedule,
                                    overlap=threaded_forward_backward if threaded else None)
    ctx = torch.no_grad() if forward_only else torch.enable_grad()
    with ctx:
        losses = run(forward_step_func=forward_step, data_iterator=iters, model=chunks,
                     num_microbatches=N, seq_length=S, micro_batch_size=B,
                     forward_only=forward_only, p2p_order=p2p_order)
    if dealloc:
        assert freed and max(freed) <= 4, freed  # every rank sends outputs; one element kept
    return [float(l["lm loss"]) for l in losses], grads_by_global_name(chunks), \
        [[l.layer_number for l in c.decoder.layers] for c in chunks], \
        [(c.mtp_process, hasattr(c, "mtp"), hasattr(c, "embedding")) for c in chunks]


def _reference(mtp, N, layers):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from megatron_dsv3.model import build_model

    model = build_model(_config(mtp, layers))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / N))
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0 / N))
    losses = []
    for batch in _batches(N):
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        total = (per_token.float() * batch["loss_mask"]).sum()
        (total / batch["loss_mask"].sum() / N).backward()
        losses.append(float(total))
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


# p2p_order: None takes gloo's default ("tagged": receives posted ahead, matched by tag);
# "ordered" is the plan NCCL gets (DeepSeek's transfer order, in batches), run here on gloo;
# threaded: F&B pairs in two threads (as the trainer runs them)
CASES = [("dualpipev", 2, True, 4, 4, None, False), ("dualpipe", 2, False, 4, 4, None, False),
         ("dualpipev", 4, True, 8, 8, None, False), ("dualpipe", 4, False, 8, 4, None, False),
         ("dualpipev", 4, True, 8, 8, "ordered", False),
         ("dualpipe", 4, False, 8, 4, "ordered", False),
         ("dualpipev", 4, True, 8, 8, "ordered", True)]
# Megatron's deallocate_pipeline_outputs (Megatron-LM sets it): a sent output keeps one element
DEALLOC = [("dualpipev", 2, True, 4, 4, None, False, True),
           ("dualpipe", 4, False, 8, 4, "ordered", False, True),
           ("dualpipev", 4, True, 8, 8, None, True, True)]


@pytest.mark.parametrize("schedule,ranks,mtp,N,layers,p2p_order,threaded,dealloc",
                         [c + (False,) for c in CASES] + DEALLOC)
def test_pipelined_losses_and_gradients_equal_unpipelined(single_rank_world, schedule, ranks, mtp,
                                                          N, layers, p2p_order, threaded, dealloc):
    ref_losses, ref_grads = _reference(mtp, N, layers)
    results = run_distributed(_pipelined, ranks,
                              args=(schedule, mtp, False, N, layers, p2p_order, threaded, dealloc),
                              megatron_parallel={"pipeline_model_parallel_size": ranks})
    losses = [l for r in results for l in r[0]]
    assert sorted(losses) == pytest.approx(sorted(ref_losses), rel=1e-5)
    seen = set()
    for _, grads, *_ in results:
        for name, g in grads.items():
            # the schedule adds the micro-batches' contributions in another order (and defers
            # some weight gradients): float32 reassociation only
            rel = ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)).item()
            assert rel < 1e-5, (name, rel)
            seen.add(name)
    assert seen == set(ref_grads)  # every parameter of the model lives on some chunk
    if schedule == "dualpipev" and ranks == 2:  # rank 0: stage 0 (layer 1), stage 3 (layer 4)
        assert results[0][2] == [[1], [4]] and results[1][2] == [[2], [3]]
    if schedule == "dualpipev" and ranks == 4:  # the V: rank r holds stages r and 7 - r
        assert [r[2] for r in results] == [[[1], [8]], [[2], [7]], [[3], [6]], [[4], [5]]]
    if mtp:  # MTP (and the embedding it reads) on the last stage only: rank 0's second chunk,
        # not the last pipeline rank where Megatron >= 0.17 would put it (compat)
        assert results[0][3] == [(False, False, True), (True, True, True)]
        assert all(r[3] == [(False, False, False)] * 2 for r in results[1:])


@pytest.mark.parametrize("p2p_order", [None, "ordered"])
def test_dualpipev_forward_only_evaluation(single_rank_world, p2p_order):
    ref_losses, _ = _reference(True, 4, 4)
    results = run_distributed(_pipelined, 2, args=("dualpipev", True, True, 4, 4, p2p_order),
                              megatron_parallel={"pipeline_model_parallel_size": 2})
    assert results[0][0] == pytest.approx(ref_losses, rel=1e-5) and results[1][0] == []


def test_invalid_settings_are_refused():
    from megatron_dsv3.pipeline.schedules import check

    with pytest.raises(ValueError, match="even number of pipeline ranks"):
        check("dualpipe", 3, 12)
    with pytest.raises(ValueError, match="micro-batches >= 2 x ranks"):
        check("dualpipev", 4, 6)
    with pytest.raises(ValueError, match="allowed values are"):
        check("gpipe", 4, 8)


def test_negative_recv_lookahead_is_refused_naming_the_field():
    from megatron_dsv3.pipeline import forward_backward_dualpipev

    with pytest.raises(ValueError, match=r"recv_lookahead=-1: allowed values are integers >= 0"):
        forward_backward_dualpipev(forward_step_func=None, data_iterator=None,
                                   model=[object(), object()], num_microbatches=4, seq_length=4,
                                   micro_batch_size=1, recv_lookahead=-1)


def _one_iterator(rank, world):
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import forward_backward_dualpipev

    chunks = build_model_chunks(_config(False, 2), "dualpipev", rank, world)
    with pytest.raises(ValueError, match="data_iterator=.*list of two iterators"):
        forward_backward_dualpipev(forward_step_func=forward_step,
                                   data_iterator=iter(_batches(2)), model=chunks,
                                   num_microbatches=2, seq_length=S, micro_batch_size=B)
    return True


def test_one_iterator_for_both_chunks_is_refused(single_rank_world):
    """Rank 0's two DualPipeV chunks both read the batch: one shared iterator would give one
    chunk the tokens of a micro-batch and the other the labels of the next."""
    assert run_distributed(_one_iterator, 1,
                           megatron_parallel={"pipeline_model_parallel_size": 1}) == [True]


def _non_scalar_loss(rank, world):
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import forward_backward_dualpipev

    def per_token_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        # a per-token loss left unreduced: the last stage's output is not a scalar
        return out, lambda per_token: (per_token.float(), torch.tensor(1), {})

    chunks = build_model_chunks(_config(False, 2), "dualpipev", rank, world)
    with pytest.raises(RuntimeError, match=r"output of chunk 1 has shape \(2, 16\); its "
                                           r"backward starts from a scalar loss"):
        forward_backward_dualpipev(forward_step_func=per_token_step,
                                   data_iterator=[iter(_batches(2)), iter(_batches(2))],
                                   model=chunks, num_microbatches=2, seq_length=S,
                                   micro_batch_size=B)
    return True


def test_a_non_scalar_loss_is_refused_naming_its_shape(single_rank_world):
    """The backward of the last stage starts from the loss (autograd's engine is called
    directly, without torch.autograd.backward's implicit-gradient check)."""
    assert run_distributed(_non_scalar_loss, 1,
                           megatron_parallel={"pipeline_model_parallel_size": 1}) == [True]


def test_grad_scale_func_scales_every_gradient(single_rank_world):
    """Megatron's grad_scale_func scales the last stage's loss before its backward (and the
    MoE aux-loss and MTP scales with it): every gradient is the unscaled one times the scale,
    the reported losses are unscaled."""
    ref_losses, ref_grads = _reference(True, 2, 2)
    [(losses, grads, *_)] = run_distributed(
        _pipelined, 1, args=("dualpipev", True, False, 2, 2, None, False, False, 4.0),
        megatron_parallel={"pipeline_model_parallel_size": 1})
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        want = 4.0 * ref_grads[name]
        assert ((g - want).norm() / want.norm().clamp_min(1e-12)).item() < 1e-5, name


def _wrong_seq_length(rank, world):
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import forward_backward_dualpipev

    chunks = build_model_chunks(_config(False, 2), "dualpipev", rank, world)
    with pytest.raises(ValueError, match=r"chunk 0's output has shape \(16, 2, \d+\); the "
                                         r"pipeline's transfers carry .* = \(17, 2, \d+\)"):
        forward_backward_dualpipev(forward_step_func=forward_step,
                                   data_iterator=[iter(_batches(2)), iter(_batches(2))],
                                   model=chunks, num_microbatches=2, seq_length=S + 1,
                                   micro_batch_size=B)
    return True


def test_an_output_of_another_shape_than_the_transfers_is_refused(single_rank_world):
    """seq_length that is not the batches' one: the stage's output does not fit the transfer
    buffers (on NCCL a size mismatch hangs or corrupts; here it is named at the first send)."""
    assert run_distributed(_wrong_seq_length, 1,
                           megatron_parallel={"pipeline_model_parallel_size": 1}) == [True]


def _megatron_timers_and_finalize(rank, world):
    from megatron.core import timers as megatron_timers

    from megatron_dsv3.compat import cuda_on_cpu
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import forward_backward_dualpipev

    config = _config(False, 2)
    # Megatron-LM's loop sets config.timers; --timing-log-level 2 makes the per-micro-batch
    # timers real ones, which assert that each stop follows its start
    config.timers = megatron_timers.Timers(2, "minmax")
    seen = []
    config.finalize_model_grads_func = lambda model, num_tokens, **kw: seen.append(kw)
    chunks = build_model_chunks(config, "dualpipev", rank, world)
    pg = object()  # passed through untouched (no `.pp`: the pipeline group is parallel_state's)
    with cuda_on_cpu(megatron_timers):  # (its timers call torch.cuda.synchronize)
        start = time.perf_counter()
        forward_backward_dualpipev(forward_step_func=forward_step,
                                   data_iterator=[iter(_batches(2)), iter(_batches(2))],
                                   model=chunks, num_microbatches=2, seq_length=S,
                                   micro_batch_size=B, force_all_reduce=True,
                                   pg_collection=pg)
        wall = time.perf_counter() - start
    elapsed = {name: config.timers(name).elapsed(reset=False)
               for name in ("forward-backward", "forward-compute", "backward-compute")}
    return elapsed, wall, seen == [{"pg_collection": pg, "force_all_reduce": True}]


def test_megatron_timers_and_finalize_arguments(single_rank_world):
    """Megatron-LM's loop with --timing-log-level 2: the step times itself as Megatron's
    schedules do ('forward-backward' around it, 'forward-compute' and 'backward-compute' around
    each micro-batch's halves, the compute inside the step), and finalize_model_grads_func gets
    Megatron's pg_collection and force_all_reduce."""
    [(elapsed, wall, finalize_args)] = run_distributed(
        _megatron_timers_and_finalize, 1, megatron_parallel={"pipeline_model_parallel_size": 1})
    assert finalize_args
    assert 0 < elapsed["forward-compute"] and 0 < elapsed["backward-compute"]
    assert elapsed["forward-compute"] + elapsed["backward-compute"] <= elapsed["forward-backward"]
    assert elapsed["forward-backward"] <= wall



def _lanes_seen_in_backward(rank, world):
    from megatron_dsv3.lanes import current_lane
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.pipeline import forward_backward_dualpipev

    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append((current_lane(), torch._C._is_multithreading_enabled()))
            return g

    def step(data_iterator, model):
        out, loss_func = forward_step(data_iterator, model)
        return Spy.apply(out), loss_func

    chunks = build_model_chunks(_config(False, 2), "dualpipev", rank, world)
    forward_backward_dualpipev(forward_step_func=step, model=chunks,
                               data_iterator=[iter(_batches(2)), iter(_batches(2))],
                               num_microbatches=2, seq_length=S, micro_batch_size=B)
    return seen


def test_backward_passes_run_on_the_calling_thread_in_the_backward_lane(single_rank_world):
    """The MoE dispatcher picks its process groups by the calling thread's lane. On CUDA the
    autograd engine runs backward nodes on the device's worker thread unless multithreaded
    backward is off, and there the lane read 0: the backward's all-to-alls went on the forward
    lane's groups. Every backward node of the step sees lane 1 with multithreading off."""
    [seen] = run_distributed(_lanes_seen_in_backward, 1,
                             megatron_parallel={"pipeline_model_parallel_size": 1})
    assert len(seen) == 4 and set(seen) == {(1, False)}, seen  # 2 chunks x 2 micro-batches


@pytest.mark.parametrize("schedule,ranks,N", [("dualpipe", 4, 8), ("dualpipev", 4, 8)])
@pytest.mark.parametrize("lookahead", [0, 2, 5])
def test_each_receive_is_posted_once_lookahead_ops_before_its_op(schedule, ranks, N, lookahead):
    """The receive plan (built once per configuration) against the rule it implements: a
    transfer from another rank is posted before the op `lookahead` places ahead of the first op
    that reads it (before op 0 when that is earlier), once; same-rank hand-offs never."""
    from megatron_dsv3.pipeline.executor import receive_plan
    from megatron_dsv3.pipeline.schedules import build, layout, neighbours

    lay = layout(schedule, ranks)
    for rank, ops in enumerate(build(schedule, ranks, N)):
        peers = [neighbours(lay, rank, c) for c in range(2)]
        plan = receive_plan(ops, peers, rank, lookahead)
        want = {}
        for j, op in enumerate(ops):
            reads = {"F": [("F", op.chunk, op.mb)], "B": [("B", op.chunk, op.mb)],
                     "FB": [("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2)]}.get(op.kind, [])
            for kind, chunk, mb in reads:
                src = peers[chunk][0 if kind == "F" else 1]
                if src is not None and src[0] != rank:
                    want.setdefault((kind, chunk, mb), max(0, j - lookahead))
        got = [(key, i) for i, keys in enumerate(plan) for key in keys]
        assert len(plan) == len(ops) and sorted(got) == sorted(want.items()), (rank, got, want)


def _loop_order(rank, world, schedule, forward_only):
    from megatron_dsv3.pipeline import get_forward_backward_func
    from megatron_dsv3.pretrain_gpt import megatron_loop_schedule
    from megatron_dsv3.testing.pipeline_checks import TinyStage

    H, N = 4, 4

    def step(data_iterator, model):
        x = next(data_iterator)

        def loss_func(out):
            return out.float().mean(), {"mb": x.flatten()[0].clone()}
        return model(x), loss_func

    chunks = []
    for c in range(2):
        m = TinyStage(H)
        stage = (rank if c == 0 else world - 1 - rank) if schedule == "dualpipe" else \
            (rank if c == 0 else 2 * world - 1 - rank)
        last = world - 1 if schedule == "dualpipe" else 2 * world - 1
        m.pre_process, m.post_process = stage == 0, stage == last
        chunks.append(m)
    data = iter([torch.full((2, 1, H), float(i)) for i in range(N)])  # micro-batch i holds i
    run = megatron_loop_schedule(get_forward_backward_func(schedule), schedule, 0)
    with torch.no_grad() if forward_only else torch.enable_grad():
        losses = run(forward_step_func=step, data_iterator=data, model=chunks,
                     num_microbatches=N, seq_length=2, micro_batch_size=1,
                     forward_only=forward_only)
    return [int(d["mb"]) for d in losses]


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_megatron_loop_gets_the_outputs_in_micro_batch_order(schedule):
    """Megatron's schedules return the step's loss dicts (or evaluation's non-loss data) in
    micro-batch order; under DualPipe the last rank returned the second half first (direction
    1 ends on rank 0, whose outputs were gathered first)."""
    for forward_only in (False, True):
        got = run_distributed(_loop_order, 2, args=(schedule, forward_only),
                              megatron_parallel={"pipeline_model_parallel_size": 2})
        assert got == [[], [0, 1, 2, 3]], (forward_only, got)


def _first_microbatch_calls(rank, world, forward_only, first_val_step):
    from megatron_dsv3.pipeline import forward_backward_dualpipev
    from megatron_dsv3.testing.pipeline_checks import TinyStage, tiny_forward_step

    events = []

    class Recording(TinyStage):
        def set_is_first_microbatch(self):
            events.append(("first", self.index))

        def forward(self, x=None):
            events.append(("forward", self.index))
            return super().forward(x)

    chunks = [Recording(4), Recording(4)]
    for i, c in enumerate(chunks):
        c.index = i
    data = [torch.ones(2, 1, 4) for _ in range(3)]
    with torch.no_grad() if forward_only else torch.enable_grad():
        for _ in range(2):  # two steps
            forward_backward_dualpipev(forward_step_func=tiny_forward_step, model=chunks,
                                       data_iterator=[iter(data), iter(data)],
                                       num_microbatches=3, seq_length=2, micro_batch_size=1,
                                       forward_only=forward_only, first_val_step=first_val_step)
    return events


@pytest.mark.parametrize("forward_only,first_val_step,calls", [
    (False, None, True), (True, None, True), (True, True, True), (True, False, False)])
def test_each_chunk_is_told_its_first_micro_batch_of_every_step(single_rank_world, forward_only,
                                                                 first_val_step, calls):
    """As Megatron's forward_step: set_is_first_microbatch (Transformer Engine's FP8 weight
    caches are refreshed on it) before each chunk's first forward of a step, and not in an
    evaluation step after the first (first_val_step=False)."""
    [events] = run_distributed(_first_microbatch_calls, 1, args=(forward_only, first_val_step),
                               megatron_parallel={"pipeline_model_parallel_size": 1})
    for chunk in (0, 1):
        mine = [e for e, c in events if c == chunk]
        assert mine.count("forward") == 6
        if calls:  # once per step, right before the step's first forward of the chunk
            assert mine == (["first"] + ["forward"] * 3) * 2, mine
        else:
            assert "first" not in mine, mine
