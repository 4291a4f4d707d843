"""Traffic counters: what the dispatches of a step cost the network, as one rank saw it.

Each dispatcher owns a `TrafficCounters`; its hops add the bytes they hand to torch.distributed
(payload, routing metadata and, in training, the gradients of the backward pass). A training loop
reads them after a step and resets them:

    per_layer = dispatch_counters(model)        # {"decoder.layers.3.mlp": TrafficCounters, ...}
    step = TrafficCounters.total(per_layer.values())
    log(step.inter_node_bytes, step.intra_node_bytes, step.tokens_over_node_limit)
    for c in per_layer.values(): c.reset()
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Optional

import torch


@dataclass
class TrafficCounters:
    inter_node_bytes: int = 0
    """Bytes this rank sent to ranks on other nodes (both passes, payload and metadata)."""
    intra_node_bytes: int = 0
    """Bytes this rank sent to other ranks of its own node."""
    tokens: int = 0
    """Tokens this rank dispatched."""
    inter_node_copies: int = 0
    """Token copies this rank sent to other nodes in dispatches (at most one per token and node)."""
    max_nodes_per_token: int = 0
    """The most nodes (its own included) any of this rank's tokens reached."""
    tokens_over_node_limit: int = 0
    """Tokens that reached more nodes than node-limited routing allows (0 unless the routing that
    chose the experts broke the limit; the transport still delivers them)."""
    tokens_per_expert: Optional[torch.Tensor] = None
    """[E_local] rows this rank's experts received."""

    def add_sent(self, sent_bytes: List[int], links: List[str]) -> None:
        """Count bytes sent to each group member, by the link ("inter", "intra", "self")."""
        for n, link in zip(sent_bytes, links):
            if link == "inter":
                self.inter_node_bytes += n
            elif link == "intra":
                self.intra_node_bytes += n

    def add_tokens_per_expert(self, counts: List[int]) -> None:
        t = torch.tensor(counts, dtype=torch.long)
        self.tokens_per_expert = t if self.tokens_per_expert is None else self.tokens_per_expert + t

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    @classmethod
    def total(cls, counters: Iterable["TrafficCounters"]) -> "TrafficCounters":
        """Sum over layers (the max for max_nodes_per_token; tokens_per_expert is per layer and
        stays None)."""
        out = cls()
        for c in counters:
            for name in ("inter_node_bytes", "intra_node_bytes", "tokens", "inter_node_copies",
                         "tokens_over_node_limit"):
                setattr(out, name, getattr(out, name) + getattr(c, name))
            out.max_nodes_per_token = max(out.max_nodes_per_token, c.max_nodes_per_token)
        return out


def dispatch_counters(model_chunks) -> Dict[str, TrafficCounters]:
    """The counters of every dispatcher in a model (or list of model chunks), by module name."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    found: Dict[str, TrafficCounters] = {}
    for i, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            counters = getattr(getattr(module, "dispatcher", None), "counters", None)
            if isinstance(counters, TrafficCounters):
                found[name if len(chunks) == 1 else f"{i}.{name}"] = counters
    return found
