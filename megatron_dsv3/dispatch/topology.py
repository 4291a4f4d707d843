"""Which expert-parallel ranks share a node, the process groups of the two dispatch stages, and
the node limit that grouped routing puts on every token.

Ranks per node come from MEGATRON_DSV3_RANKS_PER_NODE if set, else torchrun's LOCAL_WORLD_SIZE
(1 when neither is set): tests simulate several nodes on one machine by setting the former.
Global rank g lives on node g // ranks_per_node. The expert-parallel group [g_0, ..., g_{W-1}]
(global ranks, in EP-rank order) must cover N nodes with L ranks each, node by node; EP rank i is
then (node i // L, local index i % L). Stage one of a dispatch talks among the ranks with the
same local index, one per node (the "rail"); stage two among the L ranks of one node.

Lanes (megatron_dsv3.lanes): every rail and node group exists once per lane, and a collective goes
on the calling thread's lane (`LaneGroups.current`). Training sets forward passes on lane 0 and
backward passes (autograd, recompute included) on lane 1; decoding puts its two micro-batches on
lanes 0 and 1. On each lane the collectives come in the same order on all expert-parallel ranks,
so a DualPipe F&B pair can run its forward and its backward in two threads, each with its
all-to-alls in flight while the other computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from megatron_dsv3.lanes import LANES, current_lane
from megatron_dsv3.liveness import group_timeout

ENV_RANKS_PER_NODE = "MEGATRON_DSV3_RANKS_PER_NODE"


class LaneGroups:
    """One process group per lane over the same ranks; `current()` is the calling thread's."""

    def __init__(self, groups: List[object]):
        self.groups = list(groups)

    def current(self):
        return self.groups[current_lane()]

    def size(self) -> int:
        return dist.get_world_size(self.groups[0])


def resolve_group(group):
    """The process group to issue a collective on now: a LaneGroups' current lane, or `group`."""
    return group.current() if isinstance(group, LaneGroups) else group


def ranks_per_node() -> int:
    for name in (ENV_RANKS_PER_NODE, "LOCAL_WORLD_SIZE"):
        value = os.environ.get(name)
        if value is not None:
            try:
                n = int(value)
            except ValueError:
                n = 0
            if n <= 0:
                raise ValueError(f"{name}={value!r} is invalid: allowed values are positive "
                                 "integers (ranks per node)")
            return n
    return 1


@dataclass
class EPTopology:
    ep_ranks: List[int]  # global ranks of the expert-parallel group, in EP-rank order
    ep_rank: int
    ranks_per_node: int  # L: EP ranks on one node
    num_nodes: int  # N: nodes the EP group spans
    node: int
    local: int  # local index within the node
    rail_group: Optional[LaneGroups]  # the N ranks with this rank's local index, one per node
    node_group: Optional[LaneGroups]  # the L ranks of this node
    ep_group: Optional[LaneGroups] = None  # the whole expert-parallel group (flat all-to-all)

    def node_of_ep_rank(self, r: int) -> int:
        return r // self.ranks_per_node


def node_layout(ranks: List[int], rpn: int) -> Tuple[int, int]:
    """(L, N) for the expert-parallel group `ranks` (global ranks) with `rpn` ranks per node:
    L EP ranks on each of N nodes. ValueError unless the group splits into equal node blocks."""
    nodes_of = [g // rpn for g in ranks]
    per_node: Dict[int, int] = {}
    for n in nodes_of:
        per_node[n] = per_node.get(n, 0) + 1
    counts = set(per_node.values())
    ordered = all(a <= b for a, b in zip(nodes_of, nodes_of[1:]))
    if len(counts) != 1 or not ordered:
        layout = {n: [g for g in ranks if g // rpn == n] for n in per_node}
        raise ValueError(
            f"{ENV_RANKS_PER_NODE}/LOCAL_WORLD_SIZE={rpn} ranks per node puts the "
            f"expert-parallel group {ranks} on nodes {layout}: allowed are ranks-per-node values "
            f"that give every node the same number of EP ranks, node after node (for an EP group "
            f"of the whole world: divisors of expert_model_parallel_size={len(ranks)})")
    L = counts.pop()
    return L, len(ranks) // L


def node_limit(num_nodes: int, num_groups: Optional[int], group_topk: Optional[int]) -> int:
    """The most nodes one token can reach when the experts are split into `num_groups` groups, each
    node holds num_groups / num_nodes whole groups, and routing keeps `group_topk` groups.

    ValueError naming moe_router_num_groups when the groups do not align with the nodes."""
    groups = num_groups or 1
    if num_nodes == 1:
        return 1
    if groups % num_nodes:
        raise ValueError(
            f"moe_router_num_groups={num_groups} does not group the experts by node: the "
            f"expert-parallel group spans {num_nodes} nodes, and node-limited routing needs each "
            f"node to hold whole groups; allowed values: multiples of {num_nodes} that divide "
            f"num_moe_experts")
    return min(group_topk or groups, num_nodes)


# (EP ranks..., L) -> (rail groups by local index, node groups by node, extra lanes of the EP
# group); None where this rank is no member. Groups from initialize_dispatch_groups (created by
# every rank) and groups created on first use (by their members) are kept apart, so every rank
# makes the same collective calls.
_COLLECTIVE_GROUPS: Dict[Tuple[int, ...], Tuple[list, list, list]] = {}
_MEMBER_GROUPS: Dict[Tuple[int, ...], Tuple[list, list, list]] = {}


def _rails_and_nodes(ranks: List[int], L: int, N: int) -> Tuple[List[List[int]], List[List[int]]]:
    rails = [[ranks[n * L + l] for n in range(N)] for l in range(L)]
    nodes = [ranks[n * L:(n + 1) * L] for n in range(N)]
    return rails, nodes


def initialize_dispatch_groups(ep_group=None, rpn: Optional[int] = None) -> None:
    """Create the rail and node groups of every expert-parallel group, collectively on all ranks.

    Optional: `build_topology` creates a rank's own groups on first use, with only their members
    taking part (use_local_synchronization). Call this instead to create them all up front."""
    from megatron.core import parallel_state

    ep_group = ep_group or parallel_state.get_expert_model_parallel_group()
    rpn = ranks_per_node() if rpn is None else rpn
    mine = dist.get_process_group_ranks(ep_group)
    everyone: List[List[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    for ranks in sorted({tuple(r) for r in everyone}):
        L, N = node_layout(list(ranks), rpn)
        key = ranks + (L,)
        if key not in _COLLECTIVE_GROUPS:
            rails, nodes = _rails_and_nodes(list(ranks), L, N)
            t = group_timeout()  # new_group does not inherit the default group's timeout
            _COLLECTIVE_GROUPS[key] = (
                [LaneGroups([dist.new_group(r, timeout=t) for _ in range(LANES)]) for r in rails],
                [LaneGroups([dist.new_group(n, timeout=t) for _ in range(LANES)]) for n in nodes],
                [dist.new_group(list(ranks), timeout=t) for _ in range(LANES - 1)])


def _own_groups(ranks: List[int], L: int, N: int, me: int) -> Tuple[list, list, list]:
    """This rank's rail and node group (and the extra lanes of the whole expert-parallel group),
    created by their members only: every rail is created by its members before any node group,
    so the member-local barriers cannot wait on each other."""
    rails, nodes = _rails_and_nodes(ranks, L, N)
    t = group_timeout()  # new_group does not inherit the default group's timeout
    rail = LaneGroups([dist.new_group(rails[me % L], timeout=t, use_local_synchronization=True)
                       for _ in range(LANES)])
    node = LaneGroups([dist.new_group(nodes[me // L], timeout=t, use_local_synchronization=True)
                       for _ in range(LANES)])
    own_rails = [rail if l == me % L else None for l in range(L)]
    own_nodes = [node if n == me // L else None for n in range(N)]
    ep_lanes = [dist.new_group(ranks, timeout=t, use_local_synchronization=True)
                for _ in range(LANES - 1)]
    return own_rails, own_nodes, ep_lanes


def build_topology(ep_group, rpn: Optional[int] = None) -> EPTopology:
    """This rank's view of `ep_group`'s nodes, with the process groups of both stages."""
    ranks = dist.get_process_group_ranks(ep_group)
    rpn = ranks_per_node() if rpn is None else rpn
    L, N = node_layout(ranks, rpn)
    me = ranks.index(dist.get_rank())
    key = tuple(ranks) + (L,)
    groups = _COLLECTIVE_GROUPS.get(key) or _MEMBER_GROUPS.get(key)
    if groups is None:
        groups = _MEMBER_GROUPS[key] = _own_groups(ranks, L, N, me)
    rails, nodes, ep_lanes = groups
    return EPTopology(ranks, me, L, N, me // L, me % L, rails[me % L], nodes[me // L],
                      LaneGroups([ep_group] + ep_lanes))
