"""DualPipeV's F&B pairs run in two threads (forward on lane 0, backward on lane 1 of the
dispatcher's process groups): the training step is bitwise the sequential one, and the trace shows
one half's all-to-alls in flight while the other half runs."""

import json
import threading

import pytest
import torch

from megatron_dsv3.lanes import StepTrace
from megatron_dsv3.pipeline.overlap import threaded_forward_backward
from megatron_dsv3.testing.distributed import run_distributed
from megatron_dsv3.training.trainer import TrainArgs, Trainer


def _args(tmp, **kw):
    base = dict(steps=2, micro_batch_size=2, micro_batches=4, seq_length=32, log_interval=100,
                cache_dir=str(tmp / "cache"), corpus_bytes=1 << 18, warmup_steps=1, pp=2, ep=2,
                ranks_per_node=1, dispatch_chunks=2,
                watchdog_timeout=60.0)  # (slow allowance 180 s < the launcher's timeout)
    base.update(kw)
    return TrainArgs(**base)


def _train(rank, world, tmp, overlap):
    run = tmp / f"run_{overlap}"
    trainer = Trainer(_args(tmp, overlap_pairs=overlap, trace_step=2, save_dir=str(run)))
    history = trainer.train()
    biases = [m.expert_bias.clone() for c in trainer.models for m in c.modules()
              if getattr(m, "expert_bias", None) is not None]
    with open(run / f"timeline_rank{rank}.json") as f:
        trace = json.load(f)
    return [(r["lm_loss"], r["mtp_loss"][0], r["grad_norm"]) for r in history], biases, trace


def test_threaded_pairs_equal_sequential_pairs_and_overlap(tmp_path):
    sequential = run_distributed(_train, 4, args=(tmp_path, False), megatron_parallel={
        "pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2})
    threaded = run_distributed(_train, 4, args=(tmp_path, True), megatron_parallel={
        "pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2})
    for (s_losses, s_bias, s_trace), (t_losses, t_bias, t_trace) in zip(sequential, threaded):
        assert t_losses == s_losses  # same arithmetic in each half: bitwise
        for a, b in zip(s_bias, t_bias):
            assert torch.equal(a, b)
        # pairs ran on both lanes, with MoE transfers recorded on both
        assert {o["lane"] for o in t_trace["ops"] if o["pair"]} == {0, 1}
        assert {t["lane"] for t in t_trace["transfers"]} == {0, 1}
        assert s_trace["overlap_seconds"] == 0.0  # one half after the other
    # the halves of a pair overlap in time on every rank; transfers of one half are in flight
    # while the other half runs (on some rank: how long depends on the machine's timing)
    assert sum(trace["overlap_seconds"] for _, _, trace in threaded) > 0
    for _, _, trace in threaded:
        pairs = {}
        for o in trace["ops"]:
            if o["pair"]:
                pairs.setdefault(o["kind"], []).append(o)
        together = sum(max(0.0, min(f["end"], b["end"]) - max(f["start"], b["start"]))
                       for f in pairs["F"] for b in pairs["B"])
        assert together > 0


def test_the_halves_of_a_pair_run_at_the_same_time():
    # each half waits for the other to have started: one after the other would never finish
    started = {"F": threading.Event(), "B": threading.Event()}

    def half(me, other):
        def run():
            started[me].set()
            assert started[other].wait(timeout=30), f"{other} never ran while {me} was running"
        return run

    threaded_forward_backward(half("F", "B"), half("B", "F"))


def test_an_error_in_the_forward_thread_reaches_the_caller():
    ran = []

    def forward():
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        threaded_forward_backward(forward, lambda: ran.append(threading.current_thread().name))
    assert ran == [threading.main_thread().name]  # the backward ran here, to completion


def test_lanes_are_per_thread():
    from megatron_dsv3.lanes import current_lane, on_lane

    seen = {}

    def forward():
        seen["F"] = current_lane()

    def backward():
        seen["B"] = current_lane()

    threaded_forward_backward(forward, backward)
    assert seen == {"F": 0, "B": 1} and current_lane() == 0
    with pytest.raises(ValueError, match="allowed values are 0..1"):
        with on_lane(2):
            pass


def test_trace_times_are_relative_to_the_step():
    trace = StepTrace()
    with trace.recording():
        with StepTrace.op("F", 0, 0, 0, True):
            pass
    assert len(trace.ops) == 1 and 0 <= trace.ops[0]["start"] <= trace.ops[0]["end"] < 1.0


def _traffic(rank, world):
    from types import SimpleNamespace

    from megatron_dsv3.dispatch import NodeAwareDispatcher, TrafficCounters
    from megatron_dsv3.training import trainer as trainer_module

    # rank 0 holds no MoE layer (as DualPipeV's rank 0 when its layers are dense and its only MoE
    # layer, MTP's, is elsewhere or absent); rank 1 one node-aware MoE layer that sent 1000 bytes
    dispatcher = NodeAwareDispatcher.__new__(NodeAwareDispatcher)
    dispatcher.counters = TrafficCounters(inter_node_bytes=1000)
    layers = [] if rank == 0 else [(2, SimpleNamespace(dispatcher=dispatcher))]
    trainer_module.moe_layers = lambda models: layers
    fake = SimpleNamespace(models=[], dp=2, args=SimpleNamespace(micro_batches=1,
                                                                micro_batch_size=2, seq_length=5))
    return trainer_module.Trainer.dispatch_traffic(fake), dispatcher.counters.inter_node_bytes


def test_traffic_statistic_is_collective_on_a_rank_without_moe_layers():
    # every rank joins the all-reduce, or the ranks with MoE layers wait forever (on
    # megatron-core 0.19 before MTP placement was fixed, DualPipeV's rank 0 had none)
    assert run_distributed(_traffic, 2, timeout=60) == [(50.0, 1000), (50.0, 0)]
