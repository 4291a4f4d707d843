"""Expert parallelism: the node-aware two-stage dispatcher with overlapped all-to-alls.

    base       the interface the MoE layer talks to (TokenDispatcher, LocalDispatcher)
    topology   ranks per node, the EP group's nodes, rail and node process groups, node limit
    layout     pure: which rows go to which destination, at every stage
    comm       asynchronous, differentiable all-to-alls (Hop, start/wait)
    fp8_payload  E4M3 + power-of-2 1x128 scales on the wire
    counters   per-step traffic (bytes across / within nodes, tokens per expert, node limit)
    node_aware the dispatcher; flat: the one-hop baseline it is measured against

Dispatchers take explicit arguments (expert count, group, options) and know no routing policy
and no model config; `megatron_dsv3.layer_specs.make_dispatcher` picks and builds one per layer.
"""

from megatron_dsv3.dispatch.base import DispatchState, LocalDispatcher, TokenDispatcher
from megatron_dsv3.dispatch.comm import ExchangeError
from megatron_dsv3.dispatch.counters import TrafficCounters, dispatch_counters
from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher
from megatron_dsv3.dispatch.layout import copies_by_destination
from megatron_dsv3.dispatch.node_aware import NodeAwareDispatcher
from megatron_dsv3.dispatch.topology import (
    ENV_RANKS_PER_NODE,
    build_topology,
    initialize_dispatch_groups,
    node_limit,
    ranks_per_node,
)

__all__ = ["DispatchState", "ENV_RANKS_PER_NODE", "ExchangeError", "FlatAllToAllDispatcher",
           "LocalDispatcher", "NodeAwareDispatcher", "TokenDispatcher", "TrafficCounters",
           "build_topology", "copies_by_destination", "dispatch_counters",
           "initialize_dispatch_groups", "node_limit", "ranks_per_node"]
