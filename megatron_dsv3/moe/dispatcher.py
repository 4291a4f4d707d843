"""How routed tokens reach their experts and come back: the dispatcher interface.

The MoE layer knows routing; a dispatcher knows only where experts live. `dispatch` turns each
token's (expert, weight) choices into rows grouped by this rank's local experts; `combine` returns
the weighted sum of expert outputs to each token's position. Expert parallelism plugs in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron.core import parallel_state


@dataclass
class DispatchState:
    """What combine needs to undo a dispatch."""

    num_tokens: int
    token_index: torch.Tensor  # [N] source token of each dispatched row
    weights: torch.Tensor  # [N] combine weight of each dispatched row
    extra: Optional[object] = None


class TokenDispatcher:
    """Interface. `num_local_experts` and `local_expert_offset` describe this rank's experts."""

    def __init__(self, config, ep_group=None):
        self.config = config
        self.num_experts = config.num_moe_experts
        self.ep_group = ep_group
        ep = ep_group.size() if ep_group is not None else 1
        rank = ep_group.rank() if ep_group is not None else 0
        self.num_local_experts = self.num_experts // ep
        self.local_expert_offset = rank * self.num_local_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        """x [T, h], indices/weights [T, k] -> (rows [N, h] sorted by local expert,
        tokens per local expert (list of ints), state)."""
        raise NotImplementedError

    def combine(self, expert_output: torch.Tensor, state) -> torch.Tensor:
        """expert_output [N, h] -> [T, h] with each token's weighted sum."""
        raise NotImplementedError

    def forward_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        experts) -> torch.Tensor:
        """dispatch -> experts(rows, tokens_per_expert) -> combine. Dispatchers that overlap
        communication with the expert computation override this."""
        rows, counts, state = self.dispatch(x, indices, weights)
        return self.combine(experts(rows, counts), state)


def sort_by_expert(indices: torch.Tensor, num_experts: int):
    """Stable order of the T*k (token, expert) pairs by expert: (order [T*k], counts [E])."""
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def weighted_scatter_add(rows: torch.Tensor, token_index: torch.Tensor, weights: torch.Tensor,
                         num_tokens: int) -> torch.Tensor:
    """out[t] = sum over rows r of token t: weights[r] * rows[r], accumulated in float32."""
    out = torch.zeros(num_tokens, rows.shape[-1], dtype=torch.float32, device=rows.device)
    out.index_add_(0, token_index, rows.float() * weights.float()[:, None])
    return out.to(rows.dtype)


class LocalDispatcher(TokenDispatcher):
    """All experts on this rank (no expert parallelism): a permutation and its inverse."""

    def __init__(self, config, ep_group=None):
        super().__init__(config, None)

    def dispatch(self, x, indices, weights):
        k = indices.shape[1]
        order, counts = sort_by_expert(indices, self.num_experts)
        token_index = order // k
        state = DispatchState(x.shape[0], token_index, weights.flatten()[order])
        return x[token_index], counts.tolist(), state

    def combine(self, expert_output, state: DispatchState):
        return weighted_scatter_add(expert_output, state.token_index, state.weights,
                                    state.num_tokens)


def expert_parallel_group(pg_collection=None):
    group = getattr(pg_collection, "ep", None)
    if group is None:
        group = parallel_state.get_expert_model_parallel_group(check_initialized=False)
    return group


def default_dispatcher(config, ep_group):
    """LocalDispatcher without expert parallelism; with it, `config.dsv3_dispatcher`'s choice:
    the node-aware dispatcher (default) or the flat all-to-all."""
    if ep_group is None or ep_group.size() == 1:
        return LocalDispatcher
    if getattr(config, "dsv3_dispatcher", "node-aware") == "flat":
        from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher

        return FlatAllToAllDispatcher
    from megatron_dsv3.dispatch import NodeAwareDispatcher

    return NodeAwareDispatcher
