"""Expert parallelism: the node-aware two-stage dispatcher with overlapped all-to-alls."""

from megatron_dsv3.dispatch.node_aware import NodeAwareDispatcher, TrafficCounters
from megatron_dsv3.dispatch.topology import (
    ENV_RANKS_PER_NODE,
    build_topology,
    initialize_dispatch_groups,
    ranks_per_node,
)

__all__ = ["ENV_RANKS_PER_NODE", "NodeAwareDispatcher", "TrafficCounters", "build_topology",
           "initialize_dispatch_groups", "ranks_per_node"]
