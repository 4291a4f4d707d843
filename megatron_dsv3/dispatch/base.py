"""How routed tokens reach their experts and come back: the dispatcher interface.

The MoE layer knows routing; a dispatcher knows only where experts live. `dispatch` turns each
token's (expert, weight) choices into rows grouped by this rank's local experts; `combine` returns
the weighted sum of expert outputs to each token's position. Expert parallelism plugs in here.

A dispatcher is built from plain arguments (expert count, expert-parallel group, options), never
from a model config: which dispatcher a model runs, and with what, is chosen by the binding
(`megatron_dsv3.layer_specs.make_dispatcher`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchState:
    """What LocalDispatcher.combine needs to undo a dispatch."""

    order: torch.Tensor  # [T*k] the (token, choice) pairs, flattened, sorted by expert
    inverse: torch.Tensor  # [T*k] where each (token, choice) pair stands in `order`
    weights: torch.Tensor  # [T, k] each token's combine weights


class TokenDispatcher:
    """Interface over `num_experts` experts split evenly over `ep_group` (None: all here).

    `num_local_experts` and `local_expert_offset` describe this rank's experts: global experts
    [offset, offset + num_local_experts), expert e on EP rank e // num_local_experts.
    """

    def __init__(self, num_experts: int, ep_group=None):
        self.ep_group = ep_group
        ep = ep_group.size() if ep_group is not None else 1
        rank = ep_group.rank() if ep_group is not None else 0
        if num_experts <= 0 or num_experts % ep:
            raise ValueError(f"num_experts={num_experts} (num_moe_experts) cannot be split over "
                             f"the expert-parallel size {ep} (the ep_group's size, "
                             "expert_model_parallel_size): allowed are positive multiples of it")
        n_local = num_experts // ep
        self.set_expert_layout(num_experts, n_local, rank * n_local)

    def set_expert_layout(self, num_experts: int, num_local_experts: int,
                          local_expert_offset: int) -> None:
        """Serve `num_experts` (physical) experts, `num_local_experts` per EP rank, this rank's
        from global id `local_expert_offset` (e.g. after redundant experts were placed,
        megatron_dsv3.moe.eplb.apply_placement)."""
        ep = self.ep_group.size() if self.ep_group is not None else 1
        if num_local_experts <= 0 or num_local_experts * ep != num_experts:
            raise ValueError(f"num_local_experts={num_local_experts} is invalid for "
                             f"num_experts={num_experts} over {ep} expert-parallel ranks: allowed "
                             f"is num_experts / {ep}")
        if not 0 <= local_expert_offset <= num_experts - num_local_experts:
            raise ValueError(f"local_expert_offset={local_expert_offset} is invalid: allowed "
                             f"values are 0..{num_experts - num_local_experts}")
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts
        self.local_expert_offset = local_expert_offset

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


class _ExpandSorted(torch.autograd.Function):
    """x [T, h] -> rows [T*k, h] = x[order // k]: each token's k copies in expert order.

    The backward reads the gradient back through the inverse permutation and sums each token's
    k rows (a gather and a reduction) instead of scatter-adding rows into tokens."""

    @staticmethod
    def forward(ctx, x, order, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        g = g.index_select(0, inverse)
        return g.view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """rows[i] = x[perm[i]] for a permutation; the backward gathers with its inverse."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


class LocalDispatcher(TokenDispatcher):
    """All experts on this rank (no expert parallelism): a permutation and its inverse.

    Both directions are gathers: dispatch copies each token to its k expert-sorted rows, combine
    puts the rows back in (token, choice) order and takes each token's weighted sum over its k
    choices in float32 (no scatter-add forward or backward)."""

    def __init__(self, num_experts: int):
        super().__init__(num_experts, None)

    def dispatch(self, x, indices, weights):
        k = indices.shape[1]
        order, counts = sort_by_expert(indices, self.num_experts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        state = DispatchState(order, inverse, weights)
        return _ExpandSorted.apply(x, order, inverse, k), counts.tolist(), state

    def combine(self, expert_output, state: DispatchState):
        T, k = state.weights.shape
        y = _Permute.apply(expert_output, state.inverse, state.order).view(T, k, -1)
        # [T, 1, k] @ [T, k, h]: each token's weighted sum over its k choices, in float32 (or
        # wider)
        acc = torch.promote_types(expert_output.dtype, torch.float32)
        out = torch.bmm(state.weights.to(acc).unsqueeze(1), y.to(acc)).squeeze(1)
        return out.to(expert_output.dtype)
