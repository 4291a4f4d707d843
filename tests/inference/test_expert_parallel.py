"""Decoding with attention data-parallel and experts expert-parallel over 4 gloo ranks on 2
simulated nodes (node-aware dispatcher): every request's tokens are those of one rank serving all
requests with all experts. Ranks get different numbers of requests of different lengths, so they
finish at different steps and idle ranks must keep serving the others' tokens."""

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.inference import InferenceEngine, Request
from megatron_dsv3.inference.parallel import shard
from megatron_dsv3.model import build_model
from megatron_dsv3.testing.distributed import run_distributed

WORLD = 4
PROMPTS = [[5, 17, 99, 3], [42], [7, 7, 7, 7, 7, 7, 7, 7, 7], [250, 1, 2], [60, 61, 62, 63, 64, 65],
           [11, 200]]
MAX_NEW = [9, 4, 6, 12, 3, 7]


def requests():
    return [Request(p, n) for p, n in zip(PROMPTS, MAX_NEW)]


def model(ep: int):
    torch.manual_seed(0)
    return build_model(get_config("deepseek-v3-tiny", init_method_std=0.1,
                                  expert_model_parallel_size=ep))


def _serve(rank, world, speculative, micro_batches):
    from megatron_dsv3.dispatch import NodeAwareDispatcher

    m = model(world)
    dispatchers = [mod.dispatcher for mod in m.modules() if hasattr(mod, "dispatcher")]
    assert dispatchers and all(isinstance(d, NodeAwareDispatcher) for d in dispatchers)
    engine = InferenceEngine(m, block_size=4, max_batch_size=2, micro_batches=micro_batches)
    engine.trace_steps = {1, 2}
    mine = shard(requests(), rank, world)
    out = engine.generate([requests()[i] for i in mine], speculative=speculative)
    traffic = sum(d.counters.inter_node_copies for d in dispatchers)
    return ({i: r.tokens for i, r in zip(mine, out)}, engine.lockstep.rounds, traffic,
            list(engine.traces.values()))


@pytest.mark.parametrize("speculative,micro_batches", [(False, 1), (True, 2)])
def test_expert_parallel_decode_equals_one_rank(single_rank_world, speculative, micro_batches):
    """With two micro-batches each decode step runs them in two threads on the dispatcher's two
    lanes; the traced steps hold both micro-batches' all-to-alls, interleaved in time (how much
    of the transfers the other micro-batch's computation covers is measured in
    bench/inference_serving.py, not asserted)."""
    reference = InferenceEngine(model(1), block_size=4).generate(requests(),
                                                                 speculative=speculative)
    results = run_distributed(_serve, WORLD, args=(speculative, micro_batches),
                              env={"MEGATRON_DSV3_RANKS_PER_NODE": "2"},
                              megatron_parallel={"expert_model_parallel_size": WORLD})
    tokens = {}
    for served, *_ in results:
        tokens.update(served)
    assert sorted(tokens) == list(range(len(PROMPTS)))  # every request served exactly once
    assert [tokens[i] for i in range(len(PROMPTS))] == [r.tokens for r in reference]
    rounds = {r for _, r, _, _ in results}
    assert len(rounds) == 1                              # every rank ran every step
    assert sum(t for _, _, t, _ in results) > 0          # tokens did cross simulated nodes
    traces = [t for *_, ts in results for t in ts]
    assert len(traces) == 2 * WORLD
    expected = {0, 1} if micro_batches == 2 else {0}
    # both micro-batches' all-to-alls on every rank (an empty micro-batch idles through them)
    assert all({t["lane"] for t in trace["transfers"]} == expected for trace in traces)
    assert any({o["lane"] for o in trace["ops"]} == expected for trace in traces)
    if micro_batches == 2:  # the two micro-batches' work interleaved in time (threads)
        for trace in traces:
            spans = [[r for r in trace["ops"] + trace["transfers"] if r["lane"] == lane]
                     for lane in (0, 1)]
            first = [min(r["start"] for r in s) for s in spans]
            last = [max(r["end"] for r in s) for s in spans]
            assert max(first) < min(last)


def _serve_then_rebalance(rank, world):
    from megatron_dsv3.moe.eplb import (ExpertLoadRecorder, apply_placement, moe_layers,
                                        plan_placement)

    m = model(world)
    layers = moe_layers(m)
    mine = [requests()[i] for i in shard(requests(), rank, world)]

    def serve():
        for moe in layers:
            moe.dispatcher.counters.reset()
        tokens = [r.tokens for r in InferenceEngine(m, block_size=4, max_batch_size=2)
                  .generate(mine)]
        rows = torch.tensor([_rows(moe.dispatcher.counters)
                             for moe in layers])    # rows this rank computed (MTP: none, greedy)
        everyone = [torch.zeros_like(rows) for _ in range(world)]
        torch.distributed.all_gather(everyone, rows)
        return tokens, torch.stack(everyone)                         # [ranks, layers]

    recorder = ExpertLoadRecorder(m)
    tokens, before = serve()
    loads = recorder.loads(group=layers[0].dispatcher.ep_group)      # global, [layers, E]
    recorder.remove()
    apply_placement(m, [plan_placement(l, num_groups=4, num_nodes=2, num_ranks=world,
                                       num_redundant=4) for l in loads.tolist()])
    again, after = serve()
    return tokens, again, before, after, loads


def _rows(counters):
    return 0 if counters.tokens_per_expert is None else int(counters.tokens_per_expert.sum())


def test_redundant_experts_keep_tokens_and_cut_the_busiest_ranks_load(single_rank_world):
    results = run_distributed(_serve_then_rebalance, WORLD,
                              env={"MEGATRON_DSV3_RANKS_PER_NODE": "2"},
                              megatron_parallel={"expert_model_parallel_size": WORLD})
    for tokens, again, _, _, _ in results:
        assert again == tokens
    _, _, before, after, loads = results[0]
    # every routed (token, expert) pair was computed exactly once, before and after
    assert (before.sum(0) == loads.sum(1)).all() and (after.sum(0) == loads.sum(1)).all()
    worst_before, worst_after = before.max(0).values, after.max(0).values   # per MoE layer
    print(f"\nmax rows per rank, per MoE layer: {worst_before.tolist()} -> {worst_after.tolist()}"
          f" (mean {(loads.sum(1) / WORLD).tolist()})")
    assert (worst_after <= worst_before).all() and worst_after.sum() < worst_before.sum()


def _one_rank_stops(rank, world, how):
    """Rank 1 stops serving (`how`: a request it refuses, or its consumer closing the stream
    after the first event); -> (exception type, message, seconds) each rank saw."""
    import time

    engine = InferenceEngine(model(world), block_size=4, max_batch_size=2)
    mine = [Request(p, n) for p, n in zip(PROMPTS, MAX_NEW)][rank::world]
    if rank == 1 and how == "bad request":
        mine[0] = Request([10**6], 3)  # a token id outside the vocabulary
    start = time.perf_counter()
    stream = engine.stream(mine)
    try:
        for n, _ in enumerate(stream):
            if rank == 1 and how == "consumer stops" and n == 0:
                stream.close()
                return ("closed", "", time.perf_counter() - start)
    except Exception as error:
        return (type(error).__name__, str(error), time.perf_counter() - start)
    return ("finished", "", time.perf_counter() - start)


@pytest.mark.parametrize("how", ["bad request", "consumer stops"])
def test_a_rank_that_stops_serving_stops_the_others_at_once(single_rank_world, how):
    """Expert-parallel ranks must run every step together: one that stops (its own error, or a
    client that went away) says so in the next agreement, and the others end at once naming it
    instead of waiting in the next collective until the group times out."""
    results = run_distributed(_one_rank_stops, 2, args=(how,), timeout=120,
                              megatron_parallel={"expert_model_parallel_size": 2})
    (kind0, message0, seconds0), (kind1, _, _) = results
    assert kind1 == ("ValueError" if how == "bad request" else "closed")
    assert kind0 == "PeerStoppedError" and "rank 1 of the expert-parallel group" in message0
    assert seconds0 < 60  # (the group timeout is minutes)


def _error_inside_a_step_on_rank_1(rank, world):
    """Rank 1's third forward raises before its MoE layers' all-to-alls, while rank 0 waits in
    them; rank 1's process then ends (run_distributed's rank returns); -> (exception type,
    message, seconds) each rank saw."""
    import time

    from megatron_dsv3.inference.decoder import LatentDecoder

    forward, calls = LatentDecoder.forward, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            raise ZeroDivisionError("a bug of rank 1's, inside a step")
        return forward(self, *args, **kwargs)

    LatentDecoder.forward = failing
    engine = InferenceEngine(model(world), block_size=4, max_batch_size=2)
    mine = [Request(p, n) for p, n in zip(PROMPTS, MAX_NEW)][rank::world]
    start = time.perf_counter()
    try:
        engine.generate(mine)
    except Exception as error:
        return type(error).__name__, str(error), time.perf_counter() - start
    return "finished", "", time.perf_counter() - start


def test_an_error_inside_a_step_ends_the_others_with_peer_stopped_error(single_rank_world):
    """An error inside a step's forwards cannot be paired with the all-to-alls the others wait
    in; when the failing rank's process ends, their all-to-all fails (the dispatcher raises
    ExchangeError naming the group) and the engine raises PeerStoppedError from it, not a bare
    backend error, and not at the group timeout (2 minutes here)."""
    results = run_distributed(_error_inside_a_step_on_rank_1, 2, timeout=150,
                              megatron_parallel={"expert_model_parallel_size": 2})
    (kind0, message0, seconds0), (kind1, message1, _) = results
    assert kind1 == "ZeroDivisionError" and "rank 1's" in message1
    assert kind0 == "PeerStoppedError" and "inside a step" in message0, (kind0, message0)
    assert seconds0 < 60, seconds0


def _nonfinite_on_rank_1(rank, world, speculative):
    """Rank 1's third forward returns NaN logits (after its collectives, as a real overflow
    would); -> what each rank saw."""
    from megatron_dsv3.inference.decoder import LatentDecoder

    forward, calls = LatentDecoder.forward, []

    def poisoned(self, *args, **kwargs):
        logits, hidden = forward(self, *args, **kwargs)
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            logits = torch.full_like(logits, float("nan"))
        return logits, hidden

    LatentDecoder.forward = poisoned
    engine = InferenceEngine(model(world), block_size=4, max_batch_size=2)
    mine = [Request(p, n) for p, n in zip(PROMPTS, MAX_NEW)][rank::world]
    try:
        engine.generate(mine, speculative=speculative)
    except Exception as error:
        return type(error).__name__, str(error)
    return "finished", ""


@pytest.mark.parametrize("speculative", [False, True])
def test_nonfinite_logits_on_one_rank_stop_the_others_at_once(single_rank_world, speculative):
    """The check runs after a forward the other ranks took part in: the step is finished with
    the logits zeroed, then the error is raised between steps, where the others are told."""
    results = run_distributed(_nonfinite_on_rank_1, 2, args=(speculative,), timeout=120,
                              megatron_parallel={"expert_model_parallel_size": 2})
    (kind0, message0), (kind1, message1) = results
    assert kind1 == "NonFiniteLogitsError" and "non-finite logits (nan)" in message1
    assert kind0 == "PeerStoppedError" and "rank 1" in message0


def test_the_lockstep_agreement_is_made_on_the_models_device(single_rank_world, monkeypatch):
    """The agreement's tensor was always built on the CPU: an NCCL expert-parallel group reduces
    CUDA tensors only, so serving failed at its first step on GPUs (mechanism: the device the
    reduction gets; no GPU here)."""
    import torch.distributed as dist

    from megatron_dsv3.inference import parallel

    class Reached(Exception):
        pass

    def all_reduce(tensor, **_kw):
        raise Reached(tensor.device)

    model = torch.nn.Linear(2, 2, device="meta")
    monkeypatch.setattr(parallel, "expert_parallel_group_of", lambda _model: dist.group.WORLD)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reached) as reached:
        parallel.lockstep_for(model).agree(True, 1)
    assert reached.value.args[0] == torch.device("meta")
