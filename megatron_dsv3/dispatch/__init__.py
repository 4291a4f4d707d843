"""Expert parallelism: the node-aware two-stage dispatcher with overlapped all-to-alls.

    topology   ranks per node, the EP group's nodes, rail and node process groups, node limit
    layout     pure: which rows go to which destination, at every stage
    comm       asynchronous, differentiable all-to-alls (Hop, start/wait)
    fp8_payload  E4M3 + power-of-2 1x128 scales on the wire
    counters   per-step traffic (bytes across / within nodes, tokens per expert, node limit)
    node_aware the dispatcher; flat: the one-hop baseline it is measured against
"""

from megatron_dsv3.dispatch.counters import TrafficCounters, dispatch_counters
from megatron_dsv3.dispatch.layout import copies_by_destination
from megatron_dsv3.dispatch.node_aware import NodeAwareDispatcher
from megatron_dsv3.dispatch.topology import (
    ENV_RANKS_PER_NODE,
    build_topology,
    initialize_dispatch_groups,
    node_limit,
    ranks_per_node,
)

__all__ = ["ENV_RANKS_PER_NODE", "NodeAwareDispatcher", "TrafficCounters", "build_topology",
           "copies_by_destination", "dispatch_counters", "initialize_dispatch_groups",
           "node_limit", "ranks_per_node"]
