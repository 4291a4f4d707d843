"""Which expert-parallel ranks share a node, and the process groups of the two dispatch stages.

Ranks per node come from MEGATRON_DSV3_RANKS_PER_NODE if set, else torchrun's LOCAL_WORLD_SIZE
(1 when neither is set): tests simulate several nodes on one machine by setting the former.
The expert-parallel group [g_0, ..., g_{W-1}] (global ranks) is laid out as N nodes of L ranks;
EP rank i is (node i // L, local index i % L). Stage one of a dispatch talks among the ranks with
the same local index (one per node: the "rail"), stage two among the ranks of one node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

ENV_RANKS_PER_NODE = "MEGATRON_DSV3_RANKS_PER_NODE"


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
    num_nodes: int  # N
    node: int
    local: int
    rail_group: Optional[object]  # ranks with this rank's local index, one per node (size N)
    node_group: Optional[object]  # the ranks of this node (size L)

    def node_of_ep_rank(self, r: int) -> int:
        return r // self.ranks_per_node


_GROUP_CACHE: Dict[Tuple[int, ...], Tuple[list, list]] = {}


def _layout(ranks: List[int], rpn: int) -> Tuple[int, int]:
    """(L, N): EP ranks per node and nodes spanned by the group `ranks`."""
    world = len(ranks)
    nodes_of = [g // rpn for g in ranks]
    per_node: Dict[int, int] = {}
    for n in nodes_of:
        per_node[n] = per_node.get(n, 0) + 1
    counts = set(per_node.values())
    if len(counts) != 1 or any(nodes_of[i] > nodes_of[i + 1] for i in range(world - 1)):
        raise ValueError(
            f"the expert-parallel group {ranks} does not split into equal, contiguous node blocks "
            f"with {ENV_RANKS_PER_NODE}/LOCAL_WORLD_SIZE={rpn} ranks per node; allowed: a ranks "
            f"per node value such that every node holds the same number of EP ranks")
    L = counts.pop()
    return L, world // L


def _create_groups(ranks: List[int], L: int, N: int) -> None:
    key = tuple(ranks) + (L,)
    if key not in _GROUP_CACHE:
        rails = [dist.new_group([ranks[n * L + l] for n in range(N)]) for l in range(L)]
        nodes = [dist.new_group(ranks[n * L:(n + 1) * L]) for n in range(N)]
        _GROUP_CACHE[key] = (rails, nodes)


def initialize_dispatch_groups(ep_group=None, rpn: Optional[int] = None) -> None:
    """Create the rail and node groups of every expert-parallel group. Call on every rank after
    parallel_state.initialize_model_parallel (process groups are created collectively)."""
    from megatron.core import parallel_state

    ep_group = ep_group or parallel_state.get_expert_model_parallel_group()
    rpn = ranks_per_node() if rpn is None else rpn
    mine = dist.get_process_group_ranks(ep_group)
    everyone: List[List[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    for ranks in sorted({tuple(r) for r in everyone}):
        L, N = _layout(list(ranks), rpn)
        _create_groups(list(ranks), L, N)


def build_topology(ep_group, rpn: Optional[int] = None) -> EPTopology:
    """This rank's view of `ep_group`'s nodes. When the EP group is the whole world its stage
    groups are created here; otherwise `initialize_dispatch_groups` must have run on all ranks."""
    ranks = dist.get_process_group_ranks(ep_group)
    rpn = ranks_per_node() if rpn is None else rpn
    L, N = _layout(ranks, rpn)
    key = tuple(ranks) + (L,)
    if key not in _GROUP_CACHE:
        if len(ranks) != dist.get_world_size():
            raise ValueError(
                "the expert-parallel group is a subset of the world: call "
                "megatron_dsv3.dispatch.initialize_dispatch_groups() on every rank after "
                "parallel_state.initialize_model_parallel()")
        _create_groups(ranks, L, N)
    rails, nodes = _GROUP_CACHE[key]
    me = ranks.index(dist.get_rank())
    return EPTopology(ranks, me, L, N, me // L, me % L, rails[me % L], nodes[me // L])
