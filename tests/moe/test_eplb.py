"""Redundant experts: the hierarchical placement, the replica map, and applying a placement to a
running model with its outputs unchanged."""

import itertools

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.inference import InferenceEngine, Request
from megatron_dsv3.model import build_model
from megatron_dsv3.moe.eplb import (ExpertLoadRecorder, ReplicaMap, apply_placement,
                                    contiguous_placement, moe_layers, plan_placement)


def zipf_loads(E, seed, s=1.2):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(E, generator=g) + 1
    return (1000.0 / ranks.double() ** s).round().tolist()


@pytest.mark.parametrize("E,G,N,W,R", [(16, 4, 2, 4, 4), (16, 4, 2, 4, 0), (32, 8, 4, 8, 8),
                                       (16, 1, 1, 4, 4), (64, 8, 2, 16, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_placement_keeps_the_rules(E, G, N, W, R, seed):
    loads = zipf_loads(E, seed)
    p = plan_placement(loads, num_groups=G, num_nodes=N, num_ranks=W, num_redundant=R)
    S, per_node, per_group = (E + R) // W, W // N, E // G
    assert p.num_ranks == W and all(len(r) == S for r in p.slots)
    phys = p.physical_to_logical
    assert set(phys.tolist()) == set(range(E)) and phys.numel() == E + R
    for g in range(G):  # a group's experts and all their replicas on one node
        nodes = {r // per_node for r, slots in enumerate(p.slots) for e in slots
                 if e // per_group == g}
        assert len(nodes) == 1
    after = p.rank_loads(loads)
    before = contiguous_placement(E, W, N).rank_loads(loads)
    assert after.sum().item() == pytest.approx(sum(loads))
    if R:
        assert after.max() < before.max()
    # (replicas of an expert may share a rank: the planner keeps, per node, the better of the
    # packings with the replicas forced apart or not; see the next test)


def test_redundant_slots_never_balance_worse_than_none():
    """Loads [14, 48, 28, 31] on 2 ranks: forcing the replicas of 48 and 31 apart put one on the
    heaviest rank (67.5); without redundancy the busiest rank carries 62 (found by review)."""
    loads = [14, 48, 28, 31]
    none = plan_placement(loads, num_groups=1, num_nodes=1, num_ranks=2, num_redundant=0)
    two = plan_placement(loads, num_groups=1, num_nodes=1, num_ranks=2, num_redundant=2)
    assert none.rank_loads(loads).max() == 62
    assert two.rank_loads(loads).max() <= 62


def test_the_hot_expert_is_split_over_its_nodes_ranks():
    """Expert 0 carries 100 of 143: its node (groups 0 and 2, 111) cannot go below 55.5 per rank;
    two replicas of expert 0 on the node's two ranks reach 56."""
    loads = [100, 1, 1, 1, 5, 5, 5, 5, 2, 2, 2, 2, 3, 3, 3, 3]
    p = plan_placement(loads, num_groups=4, num_nodes=2, num_ranks=4, num_redundant=4)
    assert p.replicas()[0] in ([0, 5], [0, 1, 5])
    assert 0 in p.slots[0] and 0 in p.slots[1]
    assert contiguous_placement(16, 4, 2).rank_loads(loads).max() == 103
    assert 55.5 <= p.rank_loads(loads).max() <= 56


def test_replica_map_is_round_robin_per_expert_across_calls():
    p = plan_placement([9, 1, 1, 1, 1, 1, 1, 1], num_groups=1, num_nodes=1, num_ranks=4,
                       num_redundant=4)
    reps = p.replicas()
    replica_map = ReplicaMap(p)
    seen = {e: 0 for e in range(8)}
    for rows in (50, 1, 1, 3):  # decode-sized calls too: they must not all take replica 0
        indices = torch.randint(0, 8, (rows, 3))
        got = replica_map(indices)
        for pos, e in enumerate(indices.flatten().tolist()):  # naive loop in token order
            assert got.flatten()[pos].item() == reps[e][seen[e] % len(reps[e])]
            seen[e] += 1
        assert (p.physical_to_logical[got] == indices).all()


def test_ranks_in_lockstep_start_on_different_replicas():
    """Every expert-parallel rank builds the same map: started at the same count, all ranks sent
    a hot expert's decode tokens to the same replica in a step (found by review)."""
    p = plan_placement([9, 1, 1, 1, 1, 1, 1, 1], num_groups=1, num_nodes=1, num_ranks=4,
                       num_redundant=4)
    hot = torch.zeros(1, 1, dtype=torch.long)  # one token for expert 0 per rank and step
    chosen = [ReplicaMap(p, rank)(hot).item() for rank in range(4)]
    assert sorted(set(chosen)) == sorted(p.replicas()[0])  # spread over its replicas


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="num_redundant=3"):
        plan_placement([1.0] * 16, num_groups=4, num_nodes=2, num_ranks=4, num_redundant=3)
    with pytest.raises(ValueError, match="num_groups=3"):
        plan_placement([1.0] * 16, num_groups=3, num_nodes=1, num_ranks=4, num_redundant=0)
    with pytest.raises(ValueError, match="num_ranks=3"):
        plan_placement([1.0] * 16, num_groups=4, num_nodes=2, num_ranks=3, num_redundant=0)
    # loads: one finite count >= 0 per expert (a negative or NaN one bent the greedy packing)
    kw = dict(num_groups=1, num_nodes=1, num_ranks=2, num_redundant=2)
    for loads, shown in (([-5, 1, 1, 1], r"\[-5.0\]"), ([float("nan"), 1, 1, 1], r"\[nan\]"),
                         ([], r"\[\]")):
        with pytest.raises(ValueError, match=rf"loads {shown} are invalid: allowed are one "
                                             "finite load >= 0"):
            plan_placement(loads, **kw)
    with pytest.raises(ValueError, match=r"loads of shape \[2, 2\] are invalid"):
        plan_placement([[1, 1], [1, 1]], **kw)


def test_a_hand_made_placement_is_checked_before_it_can_touch_a_model():
    """apply_placement re-lays weights layer by layer: a ragged placement, one that leaves an
    expert out or names one out of range used to fail after the weights were replaced."""
    from megatron_dsv3.moe.eplb import Placement

    with pytest.raises(ValueError, match=r"ranks of \[1, 3\] slots"):
        Placement([[0], [1, 2, 3]], 4, 1)
    with pytest.raises(ValueError, match=r"places no replica of experts \[2\]"):
        Placement([[0, 1], [3, 3]], 4, 1)
    with pytest.raises(ValueError, match=r"names experts \[7\]: allowed are integers in \[0, "
                                         r"num_logical=4\)"):
        Placement([[0, 1], [2, 7]], 4, 1)
    with pytest.raises(ValueError, match="num_nodes=3 is invalid"):
        Placement([[0, 1], [2, 3]], 4, 3)
    assert Placement([[0, 1], [2, 3]], 4, 2).slots_per_rank == 2


def test_applied_placement_leaves_outputs_unchanged(single_rank_world):
    torch.manual_seed(0)
    cfg = get_config("deepseek-v3-tiny", init_method_std=0.1)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    pos = torch.arange(24).expand(2, -1)
    prompts = [Request(tokens[0, :7].tolist(), 6), Request(tokens[1, :3].tolist(), 8)]
    with torch.no_grad():
        before = model(tokens, pos, None)
    plain = InferenceEngine(model, block_size=4).generate(prompts)
    recorder = ExpertLoadRecorder(model)
    with torch.no_grad():
        model(tokens, pos, None)
    loads = recorder.loads()
    recorder.remove()
    # 48 tokens x top-4 per decoder layer; the MTP layer routes 46 (each sequence's last
    # position reads no token at depth 1)
    depths = cfg.mtp_num_layers or 0
    want = [48 * 4] * (len(moe_layers(model)) - depths) + [(48 - 2 * k) * 4
                                                           for k in range(1, depths + 1)]
    assert loads.shape == (len(moe_layers(model)), 16) and loads.sum(1).tolist() == want
    placements = [plan_placement(l, num_groups=4, num_nodes=2, num_ranks=4, num_redundant=4)
                  for l in loads.tolist()]
    apply_placement(model, placements)
    assert all(m.experts.fc1_weight.shape[0] == 20 for m in moe_layers(model))
    with torch.no_grad():
        after = model(tokens, pos, None)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert [r.tokens for r in InferenceEngine(model, block_size=4).generate(prompts)] == \
        [r.tokens for r in plain]
    with pytest.raises(ValueError, match="checkpoint the model before applying a placement"):
        model.sharded_state_dict()
    # a plain state dict would write the physical slots as the logical experts (a reload then
    # silently permuted them; found by review), and training would lose the replicas' gradients
    with pytest.raises(ValueError, match="checkpoint the model before applying a placement"):
        model.state_dict()
    with pytest.raises(ValueError, match="re-laid for serving.*without gradients"):
        model.train()(tokens, pos, None)
    model.eval()
    # placed again from other loads: still the same model
    apply_placement(model, [plan_placement(list(reversed(l)), num_groups=4, num_nodes=2,
                                           num_ranks=4, num_redundant=8) for l in loads.tolist()])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, pos, None), before, rtol=1e-5, atol=1e-5)


def test_load_recorder_leaves_padding_out(single_rank_world):
    """The recorder's hook saw only the router's positional inputs, not `valid`: padded
    positions counted as load and skewed the placement."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.eplb import ExpertLoadRecorder

    torch.manual_seed(0)
    config = get_config("deepseek-v3-tiny", mtp_num_layers=None)
    model = build_model(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 4:] = True
    recorder = ExpertLoadRecorder(model)
    with torch.no_grad():
        model(tokens, torch.arange(16).expand(2, -1), None, padding_mask=pad)
    loads = recorder.loads().sum(1).tolist()
    assert loads and loads == [int((~pad).sum()) * config.moe_router_topk] * len(loads), loads


def test_a_placement_refused_for_one_layer_leaves_every_layer_as_it_was(single_rank_world):
    """The checks ran layer by layer inside the re-laying loop: a bad placement for the second
    layer left the first re-laid (half a model placed)."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny", mtp_num_layers=None))
    layers = moe_layers(model)
    good = plan_placement([1.0] * 16, num_groups=4, num_nodes=1, num_ranks=1, num_redundant=4)
    bad = plan_placement([1.0] * 4, num_groups=4, num_nodes=1, num_ranks=1, num_redundant=0)
    with pytest.raises(ValueError, match="MoE layer 1: placement for 4 experts; the layer has 16"):
        apply_placement(model, [good, bad] + [good] * (len(layers) - 2))
    assert all(m.placement is None and m.experts.fc1_weight.shape[0] == 16 for m in layers)
