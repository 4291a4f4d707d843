"""Prefill/decode separation over gloo: one prefill rank hands latent caches to two decode ranks;
every request's tokens equal colocated serving's (one engine doing both)."""

import math

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.inference import InferenceEngine, Request, SamplingParams
from megatron_dsv3.inference.disaggregated import (Roles, Served, latency_summary, mixed_load,
                                                   serve_separated)
from megatron_dsv3.model import build_model
from megatron_dsv3.testing.distributed import run_distributed


def model():
    torch.manual_seed(0)
    return build_model(get_config("deepseek-v3-tiny", init_method_std=0.1))


def workload(sampled: bool = False):
    reqs = mixed_load(7, rate=200.0, vocab_size=256, seed=3, short_prompt=(2, 6),
                      long_prompt=(20, 30), new_tokens=(3, 9))
    reqs.append(Request([9, 8, 7], 1))  # finishes at prefill: nothing to hand over but the token
    for i in (1, 7):  # the first token's top-2 alternatives travel with the hand-off too
        reqs[i].sampling = SamplingParams(logprobs=2)
    if sampled:  # seeded sampling continues from the prefill's generator on the decode rank
        for i in (2, 5):
            reqs[i].sampling = SamplingParams(temperature=1.0, seed=11 + i)
    return reqs


def _role(rank, world, speculative):
    out = serve_separated(model(), workload(not speculative), Roles(prefill=[0], decode=[1, 2]),
                          speculative=speculative, block_size=4, max_batch_size=3)
    return {i: (s.tokens, s.finish_reason, s.token_times, s.logprobs, s.top_logprobs)
            for i, s in out.items()}


@pytest.mark.parametrize("speculative", [False, True])
def test_separated_serving_equals_colocated(single_rank_world, speculative):
    reqs = workload(not speculative)  # (speculative decoding is greedy only)
    colocated = InferenceEngine(model(), block_size=4).generate(reqs, speculative=speculative)
    results = run_distributed(_role, 3, args=(speculative,), megatron_parallel={})
    assert results[0] == {}                                   # the prefill rank finishes none
    served = {**results[1], **results[2]}
    assert sorted(served) == list(range(len(reqs)))
    assert set(results[1]) == set(range(0, len(reqs), 2))    # request i -> decode rank 1 + i % 2
    for i, r in enumerate(colocated):
        tokens, reason, times, logprobs, top = served[i]
        assert tokens == r.tokens and reason == r.finish_reason
        assert len(times) == len(tokens) and times == sorted(times)
        assert logprobs == pytest.approx(r.logprobs, rel=1e-4, abs=1e-5)
        assert [list(t) for t in top] == [list(t) for t in r.top_logprobs]


def test_mixed_load_and_latency_summary():
    reqs = mixed_load(200, rate=10.0, vocab_size=100, seed=0)
    arrivals = [r.arrival for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert 15 < arrivals[-1] < 25                             # ~199 gaps of mean 0.1 s
    long = sum(len(r.prompt) >= 48 for r in reqs) / len(reqs)
    assert 0.2 < long < 0.4
    assert all(8 <= r.max_new_tokens <= 24 and 0 < min(r.prompt) for r in reqs)
    two = [Request([1], 3, arrival=0.0), Request([1], 1, arrival=1.0)]
    served = {0: Served([5, 6, 7], "length", [10.5, 10.7, 10.9]),
              1: Served([4], "length", [12.0])}
    summary = latency_summary(two, served, start_time=10.0)
    assert summary["ttft_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["tpot_mean"] == pytest.approx(0.2)
    empty = latency_summary(two, {}, start_time=10.0)  # (nothing served: no division by 0)
    assert empty["requests"] == 0 and math.isnan(empty["ttft_mean"])
    with pytest.raises(ValueError, match="rate"):
        mixed_load(3, rate=0, vocab_size=10)
    # (a rank listed twice left one of a decode rank's two receivers waiting for an end that
    # is sent once)
    for prefill, decode in (([0], [0, 1]), ([0, 0], [1]), ([0], [1, 1]), ([-1], [1])):
        with pytest.raises(ValueError, match=r"allowed are two non-empty lists of distinct ranks "
                                             r"\(integers >= 0\), no rank in both or twice"):
            Roles(prefill=prefill, decode=decode)


def test_arrivals_gate_admission_and_are_checked(single_rank_world):
    engine = InferenceEngine(model(), block_size=4)
    events = list(engine.stream([Request([1, 2], 2, arrival=0.3), Request([3], 2)]))
    assert events[0].index == 1                      # the later-listed request arrived first
    first_of_late = next(e for e in events if e.index == 0)
    assert first_of_late.time - engine.start_time >= 0.3   # not admitted before its arrival
    with pytest.raises(ValueError, match="arrival=-1"):
        engine.generate([Request([1], 2, arrival=-1)])


def test_an_expert_parallel_model_is_refused_where_ranks_serve_their_own_requests():
    """Each rank serves its own requests there: an expert-parallel model's all-to-alls would not
    pair up across ranks (the busier one would wait for ever)."""
    from types import SimpleNamespace

    from megatron_dsv3.inference.disaggregated import Roles, serve_colocated, serve_separated

    class MoE(torch.nn.Module):
        dispatcher = SimpleNamespace(ep_group=SimpleNamespace(size=lambda: 2))

    model = torch.nn.Sequential(MoE())
    with pytest.raises(ValueError, match="serve_colocated: the model is expert-parallel"):
        serve_colocated(model, [], 0, 2)
    with pytest.raises(ValueError, match="serve_separated: the model is expert-parallel"):
        serve_separated(model, [], Roles(prefill=[0], decode=[1]))


def _prefill_fails_or_idles(rank, world, case):
    """Rank 0 prefills, rank 1 decodes. 'fails': the prefill rank's second prefill raises;
    'idles': the second request arrives 1.5 s after the first, with keep-alives every 0.3 s.
    -> (what this rank saw, the keep-alive interval of the group's timeout)."""
    import time

    from megatron_dsv3.inference import disaggregated

    interval = disaggregated._keepalive_seconds()
    reqs = [Request([5, 6, 7], 4), Request([8, 9], 3, arrival=1.5 if case == "idles" else 0.0)]
    if case == "fails" and rank == 0:
        prefill, calls = InferenceEngine.prefill, []

        def failing(self, st, speculative=False):
            calls.append(st.index)
            if len(calls) == 2:
                raise RuntimeError("prefill failed here")
            return prefill(self, st, speculative)

        InferenceEngine.prefill = failing
    if case == "idles":
        disaggregated._keepalive_seconds = lambda: 0.3
    start = time.perf_counter()
    try:
        out = serve_separated(model(), reqs, Roles(prefill=[0], decode=[1]), block_size=4)
    except Exception as error:
        return (type(error).__name__, str(error), time.perf_counter() - start), interval
    return ({i: s.tokens for i, s in out.items()}, "", time.perf_counter() - start), interval


def test_a_failing_prefill_rank_stops_its_decode_ranks_at_once(single_rank_world):
    (prefill, decode) = run_distributed(_prefill_fails_or_idles, 2, args=("fails",), timeout=90,
                                        megatron_parallel={})
    assert prefill[0][:2] == ("RuntimeError", "prefill failed here")
    kind, message, seconds = decode[0]
    assert kind == "PeerStoppedError" and "prefill rank 0 stopped" in message
    assert seconds < 45  # not the group's timeout
    assert prefill[1] == 30.0  # keep-alives every third of the group's timeout (90 s)


def test_an_idle_prefill_rank_keeps_its_decode_ranks_waiting_with_keepalives(single_rank_world):
    (prefill, decode) = run_distributed(_prefill_fails_or_idles, 2, args=("idles",), timeout=90,
                                        megatron_parallel={})
    reference = InferenceEngine(model(), block_size=4).generate(
        [Request([5, 6, 7], 4), Request([8, 9], 3)])
    assert decode[0][0] == {i: r.tokens for i, r in enumerate(reference)}
    assert prefill[0][0] == {} and decode[0][2] >= 1.5
