"""The node-aware dispatcher on 8 gloo ranks as 4 simulated nodes of 2 (one launch, several checks):
DeepSeekMoE outputs and gradients equal a single-rank DeepSeekMoE with the same weights (BF16-path
in float32, FP8 payload, top-1 onto one expert, uneven and empty ranks); each token's inter-node
copies equal its destination nodes other than its own, within the node limit; a routing that
breaks the limit is counted and still delivered; the flat all-to-all baseline agrees and sends
more across nodes; the chunk pipeline keeps transfers in flight while experts compute, in the
forward and, mirrored, in the backward. Plus the constructor's configuration errors.

Tolerances: both sides compute in float32 from identical weights (keyed init); they differ only in
the order of sums (per-chunk index_add, per-rank grouped GEMMs, the all-reduce of replicated
gradients), i.e. a few float32 roundings on sums of <= 64 terms: rtol 1e-5 (1e-4 for weight
gradients summed over every token of the world), atol 1e-6 for entries that cancel to ~0.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_dsv3.testing.distributed import run_distributed

ENV = {"MEGATRON_DSV3_RANKS_PER_NODE": "2"}
EP = {"expert_model_parallel_size": 8}
RANKS_PER_NODE = 2


def _tokens(rank, h, empty_rank=None):
    n = 0 if rank == empty_rank else 5 + 3 * rank  # uneven, possibly none
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, 1, h, generator=g), torch.randn(n, 1, h, generator=g)


def _qdq(rows):
    """The FP8 payload's quantisation, with the dispatch's straight-through gradient."""
    from megatron_dsv3.fp8.quant import dequantize_1x128, quantize_1x128

    return rows + (dequantize_1x128(*quantize_1x128(rows, pow2_scales=True)) - rows).detach()


def _nodes_of(experts, experts_per_rank):
    return {int(e) // experts_per_rank // RANKS_PER_NODE for e in experts}


def _case(rank, world, overrides, bias, empty_rank, chunks, fp8):
    import torch.distributed as dist

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.dispatch.base import LocalDispatcher
    from megatron_dsv3.moe.layer import DeepSeekMoE

    cfg = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.0, expert_model_parallel_size=8,
                     dsv3_dispatch_chunks=chunks, dsv3_dispatch_fp8=fp8, **overrides)
    ep_moe = DeepSeekMoE(cfg, get_layer_spec(cfg).submodules.moe.submodules, layer_number=2)
    ref_spec = get_layer_spec(cfg, dispatcher=LocalDispatcher).submodules.moe.submodules
    ref = DeepSeekMoE(cfg, ref_spec, layer_number=2)
    d = ep_moe.dispatcher
    assert type(d).__name__ == "NodeAwareDispatcher" and (d.codec is not None) == fp8
    for m in (ep_moe, ref):
        m.router.expert_bias.copy_(bias)
    if fp8:  # the reference quantises the routed experts' input the same way
        experts_forward = ref.experts.forward
        ref.experts.forward = lambda rows, counts: experts_forward(_qdq(rows), counts)
    h = cfg.hidden_size
    x, dy = _tokens(rank, h, empty_rank)
    x.requires_grad_()
    out, _ = ep_moe(x)
    (out * dy).sum().backward()
    # single-rank reference over everybody's tokens
    xs, dys = zip(*[_tokens(r, h, empty_rank) for r in range(world)])
    X = torch.cat(xs).requires_grad_()
    ref_out, _ = ref(X)
    (ref_out * torch.cat(dys)).sum().backward()
    start = sum(t.shape[0] for t in xs[:rank])
    sl = slice(start, start + x.shape[0])
    torch.testing.assert_close(out, ref_out[sl], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, X.grad[sl], rtol=1e-5, atol=1e-6)
    e0 = ep_moe.experts.local_expert_offset
    e1 = e0 + ep_moe.experts.num_local_experts
    for name in ("fc1_weight", "fc2_weight"):
        torch.testing.assert_close(getattr(ep_moe.experts, name).grad,
                                   getattr(ref.experts, name).grad[e0:e1], rtol=1e-4, atol=1e-6)
    for name in ("router.weight", "shared_experts.linear_fc1.weight"):
        g = dict(ep_moe.named_parameters())[name].grad.clone()
        dist.all_reduce(g)  # replicated: every rank saw its own tokens
        torch.testing.assert_close(g, dict(ref.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
    c = d.counters
    result = {"copies": c.inter_node_copies, "max_nodes": c.max_nodes_per_token,
              "over_limit": c.tokens_over_node_limit, "node_limit": d.node_limit,
              "tokens_per_expert": c.tokens_per_expert.tolist(), "timeline": d.last_timeline}
    # per token, against a naive count: copies to other nodes = destination nodes - own node
    with torch.no_grad():
        _, idx, _ = ep_moe.router(x.view(-1, h), seq_len=max(1, x.shape[0]))
    plan = d.plan(idx)
    other = plan.inter.destination != d.topo.node
    copies = torch.bincount(plan.inter.source[other], minlength=idx.shape[0]).tolist()
    nodes = [_nodes_of(idx[t], d.num_local_experts) for t in range(idx.shape[0])]
    assert copies == [len(n - {d.topo.node}) for n in nodes]
    assert plan.nodes_per_token.tolist() == [len(n) for n in nodes]
    result["expected_copies"] = sum(copies)
    result["max_naive_nodes"] = max([len(n) for n in nodes], default=0)
    return result


def _over_node_limit(rank, world):
    """Every token routed to 4 nodes while the limit is 2: counted, and still delivered."""
    from megatron.core import parallel_state

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.dispatch import NodeAwareDispatcher
    from megatron_dsv3.layer_specs import make_dispatcher

    cfg = get_config("deepseek-v3-tiny", expert_model_parallel_size=8)
    d = make_dispatcher(cfg, parallel_state.get_expert_model_parallel_group(), NodeAwareDispatcher)
    T, h = 3 + rank, cfg.hidden_size
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, h, generator=g)
    t = torch.arange(T)[:, None]
    idx = (4 * torch.arange(4)[None, :] + (t + rank) % 4) % 16  # one expert on each node
    w = torch.rand(T, 4, generator=g)
    rows, counts, state = d.dispatch(x, idx, w)
    # expert e multiplies by (e + 1): the combine must return sum_j w_j (e_j + 1) x
    scale = torch.arange(d.local_expert_offset, d.local_expert_offset + d.num_local_experts) + 1.0
    out = d.combine(rows * scale.repeat_interleave(torch.tensor(counts))[:, None], state)
    torch.testing.assert_close(out, x * (w * (idx + 1)).sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert d.node_limit == 2
    return d.counters.tokens_over_node_limit, T


def _closed_form(rank, world):
    """Both expert-parallel dispatchers against a closed form, in float64, with routings that
    name an expert twice (a custom router may): expert e multiplies its rows by e + 1, so a
    token's output is x * sum_j w_j (e_j + 1), its input gradient dy * that sum and the
    gradient of w_j (dy . x) (e_j + 1). A repeated expert's weights add up (the node-aware
    dispatcher kept only the first); float64 stays float64 (both rounded through float32)."""
    from megatron.core import parallel_state

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.dispatch import NodeAwareDispatcher
    from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher
    from megatron_dsv3.layer_specs import make_dispatcher

    cfg = get_config("deepseek-v3-tiny", expert_model_parallel_size=8)
    ep = parallel_state.get_expert_model_parallel_group()
    T, h = 4 + rank, cfg.hidden_size
    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(T, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, 4, generator=g, dtype=torch.float64, requires_grad=True)
    first = torch.randint(0, 8, (T, 1), generator=g)  # groups 0-1 (nodes 0-1): within the limit
    idx = torch.cat([first, first, (first + 3) % 8, first], 1)  # one expert three times
    dy = torch.randn(T, h, generator=g, dtype=torch.float64)
    for cls in (NodeAwareDispatcher, FlatAllToAllDispatcher):
        d = make_dispatcher(cfg, ep, cls)
        rows, counts, state = d.dispatch(x, idx, w)
        assert rows.dtype == torch.float64
        scale = torch.arange(d.local_expert_offset, d.local_expert_offset + d.num_local_experts,
                             dtype=torch.float64) + 1.0
        out = d.combine(rows * scale.repeat_interleave(torch.tensor(counts))[:, None], state)
        assert out.dtype == torch.float64
        s = (w * (idx + 1)).sum(1, keepdim=True)
        torch.testing.assert_close(out, x * s, rtol=1e-12, atol=1e-12, msg=cls.__name__)
        gx, gw = torch.autograd.grad(out, (x, w), dy)
        torch.testing.assert_close(gx, dy * s, rtol=1e-12, atol=1e-12, msg=cls.__name__)
        torch.testing.assert_close(gw, (dy * x).sum(1, keepdim=True) * (idx + 1), rtol=1e-12,
                                   atol=1e-12, msg=cls.__name__)


def _errors(rank, world):
    import os

    from megatron.core import parallel_state

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.dispatch import NodeAwareDispatcher
    from megatron_dsv3.dispatch.topology import build_topology
    from megatron_dsv3.layer_specs import make_dispatcher

    ep = parallel_state.get_expert_model_parallel_group()
    cfg = get_config("deepseek-v3-tiny", moe_router_num_groups=2, moe_router_group_topk=1,
                     expert_model_parallel_size=8)
    with pytest.raises(ValueError, match=r"moe_router_num_groups=2 .* spans 4 nodes"):
        make_dispatcher(cfg, ep, NodeAwareDispatcher)  # 2 groups cannot be split over 4 nodes
    os.environ["MEGATRON_DSV3_RANKS_PER_NODE"] = "3"  # 8 ranks do not split into nodes of 3
    with pytest.raises(ValueError, match="MEGATRON_DSV3_RANKS_PER_NODE"):
        build_topology(ep)
    os.environ["MEGATRON_DSV3_RANKS_PER_NODE"] = "2"
    # an expert id out of range is refused before any exchange (every rank here has one, so
    # none waits): -1 had no destination, and its slot and weight vanished from the combine
    d = NodeAwareDispatcher(16, ep, hidden_size=8, num_groups=4, group_topk=2)
    x, w = torch.ones(2, 8), torch.full((2, 2), 0.5)
    for bad in ([[0, -1], [1, 2]], [[0, 1], [2, 16]]):
        with pytest.raises(ValueError, match=r"expert indices range over .* 0\.\.15"):
            d.forward_experts(x, torch.tensor(bad), w, lambda rows, counts: rows)
    # a relayout (what moe.eplb.apply_placement does for redundant experts) after a forward:
    # the next forward counted its rows onto the old layout's per-expert counts and failed
    # with a shape error; the bytes counted so far stay
    with torch.no_grad():
        d.forward_experts(x, torch.tensor([[2 * rank, 15 - 2 * rank]] * 2), w,
                          lambda rows, counts: rows)
    before = d.counters.inter_node_bytes
    d.set_expert_layout(24, 3, 3 * rank)  # 2 experts per rank -> 3 physical slots per rank
    with torch.no_grad():
        out = d.forward_experts(x, torch.tensor([[3 * rank + 2, (3 * rank + 5) % 24]] * 2), w,
                                lambda rows, counts: rows)
    torch.testing.assert_close(out, x)  # identity experts, weights summing to 1
    tpe = d.counters.tokens_per_expert.tolist()
    assert len(tpe) == 3 and sum(tpe) > 0 and d.counters.inter_node_bytes >= before > 0


def _flat(rank, world):
    """The flat all-to-all baseline gives the same layer output and sends more across nodes; with
    dsv3_dispatch_fp8 it sends the same E4M3 rows (the same output as the node-aware dispatcher's
    FP8 payload, fewer bytes than its own rows in float32)."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.moe.layer import DeepSeekMoE

    result = {}
    for fp8 in (False, True):
        cfg = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.0, expert_model_parallel_size=8,
                         dsv3_dispatch_fp8=fp8)
        x, _ = _tokens(rank, cfg.hidden_size)
        outs, counters = [], []
        for d in (None, FlatAllToAllDispatcher):
            moe = DeepSeekMoE(cfg, get_layer_spec(cfg, dispatcher=d).submodules.moe.submodules,
                              layer_number=2)
            assert (moe.dispatcher.codec is not None) == fp8
            with torch.no_grad():
                outs.append(moe(x)[0])
            counters.append(moe.dispatcher.counters)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        result.update({name + ("_fp8" if fp8 else ""): (c.inter_node_copies, c.inter_node_bytes)
                       for name, c in zip(("node_aware", "flat"), counters)})
    return dict(result, hidden=cfg.hidden_size)


def _all_checks(rank, world):
    _errors(rank, world)
    _closed_form(rank, world)
    results = {"flat": _flat(rank, world), "over_limit": _over_node_limit(rank, world)}
    zero = torch.zeros(16)
    results["topk4"] = _case(rank, world, {}, zero, 6, 4, False)
    one = torch.zeros(16)
    one[5] = 100.0  # every token picks expert 5 (top-1): no drop, no deadlock
    results["single_expert"] = _case(rank, world, {"moe_router_topk": 1}, one, 3, 3, False)
    results["fp8_payload"] = _case(rank, world, {}, zero, None, 2, True)
    return results


def _in_flight_during(timeline, compute_pass, hops):
    """For each experts span of `compute_pass`, the (chunk offset, stage, pass) transfers that were
    issued before it began and waited for after it ended."""
    by_key = {(e["chunk"], e["stage"], e["pass"]): e for e in timeline}
    found = []
    for e in timeline:
        if e["stage"] != "experts" or e["pass"] != compute_pass:
            continue
        for offset, stage, p in hops:
            t = by_key.get((e["chunk"] + offset, stage, p))
            if t is not None and t["start"] <= e["start"] and t["waited"] >= e["end"]:
                found.append((e["chunk"], offset, stage))
    return found


@pytest.mark.timeout(600)
def test_node_aware_dispatch_on_4_simulated_nodes():
    results = run_distributed(_all_checks, 8, env=ENV, megatron_parallel=EP, timeout=540)
    tokens = [5 + 3 * r for r in range(8)]
    for rank, res in enumerate(results):
        for name in ("topk4", "single_expert", "fp8_payload"):
            r = res[name]
            assert r["copies"] == r["expected_copies"], (rank, name, r)
            assert r["node_limit"] == 2  # 4 groups on 4 nodes, 2 kept
            assert r["max_nodes"] == r["max_naive_nodes"] <= 2 and r["over_limit"] == 0
        # top-1 onto expert 5: only EP rank 2 (experts 4, 5) receives tokens, all of them
        tpe = res["single_expert"]["tokens_per_expert"]
        assert tpe == ([0, sum(tokens) - tokens[3]] if rank == 2 else [0, 0])
        over, T = res["over_limit"]
        assert over == T
        ours, flat = res["flat"]["node_aware"], res["flat"]["flat"]
        assert ours[0] <= flat[0] and ours[1] < flat[1]
        # FP8: the same copies; each dispatched row h + 4 * tiles bytes instead of 4 * h (the
        # combine and the routing metadata unchanged)
        flat_fp8, h = res["flat"]["flat_fp8"], res["flat"]["hidden"]
        assert flat_fp8[0] == flat[0] > 0
        assert flat[1] - flat_fp8[1] == flat[0] * (4 * h - (h + 4 * -(-h // 128)))
    assert sum(r["topk4"]["copies"] for r in results) > 0
    # chunks 0 and 1 compute while the next chunk's intra-node and the one after's inter-node
    # transfers are in flight; in the backward, chunks 2 and 3 compute while the previous
    # chunk's combine_intra gradient transfer and the one before's combine_inter are in flight
    timeline = results[0]["topk4"]["timeline"]
    forward = _in_flight_during(timeline, "forward", [(1, "dispatch_intra", "forward"),
                                                      (2, "dispatch_inter", "forward")])
    assert sorted(forward) == [(0, 1, "dispatch_intra"), (0, 2, "dispatch_inter"),
                               (1, 1, "dispatch_intra"), (1, 2, "dispatch_inter"),
                               (2, 1, "dispatch_intra")]
    backward = _in_flight_during(timeline, "backward", [(-1, "combine_intra", "backward"),
                                                        (-2, "combine_inter", "backward")])
    assert sorted(backward) == [(1, -1, "combine_intra"), (2, -2, "combine_inter"),
                                (2, -1, "combine_intra"), (3, -2, "combine_inter"),
                                (3, -1, "combine_intra")]


def test_constructor_rejects_layouts_it_cannot_serve():
    from megatron_dsv3.dispatch import NodeAwareDispatcher

    routing = dict(hidden_size=64, num_groups=4, group_topk=2)
    group = SimpleNamespace(size=lambda: 8, rank=lambda: 0)
    with pytest.raises(ValueError, match="ep_group"):
        NodeAwareDispatcher(16, None, **routing)
    with pytest.raises(ValueError, match=r"num_moe_experts=16 .* expert-parallel size 3"):
        NodeAwareDispatcher(16, SimpleNamespace(size=lambda: 3, rank=lambda: 0), **routing)
    with pytest.raises(ValueError, match="expert_tensor_parallel_size=2"):
        NodeAwareDispatcher(16, group, expert_tensor_parallel_size=2, **routing)
    with pytest.raises(ValueError, match="chunks=0"):
        NodeAwareDispatcher(16, group, chunks=0, **routing)
    with pytest.raises(ValueError, match="fp8_payload='yes'"):
        NodeAwareDispatcher(16, group, fp8_payload="yes", **routing)
    for bad in (None, 0, -4, "64", True):  # the FP8 payload needs the rows' width
        with pytest.raises(ValueError, match=f"hidden_size={bad!r} is invalid"):
            NodeAwareDispatcher(16, group, fp8_payload=True,
                                **dict(routing, hidden_size=bad))
