"""How routed tokens reach their experts and come back: the dispatcher interface.

The MoE layer knows routing; a dispatcher knows only where experts live. `dispatch` turns each
token's (expert, weight) choices into rows grouped by this rank's local experts; `combine` returns
the weighted sum of expert outputs to each token's position. Expert parallelism plugs in here.

A dispatcher is built from plain arguments (expert count, expert-parallel group, options), never
from a model config: which dispatcher a model runs, and with what, is chosen by the binding
(`megatron_dsv3.layer_specs.make_dispatcher`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from megatron_dsv3 import workspace

# The combine's CSR matrix (`_combine_matrix`) meets CSR's invariants by construction (sorted
# columns, in range); torch's one-time notice that CSR support is beta says nothing about this use.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


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
        rank = self.ep_group.rank() if self.ep_group is not None else 0
        if local_expert_offset != rank * num_local_experts:
            # every dispatcher sends expert e to expert-parallel rank e // num_local_experts
            raise ValueError(f"local_expert_offset={local_expert_offset} is invalid on "
                             f"expert-parallel rank {rank}: allowed is rank x num_local_experts "
                             f"= {rank * num_local_experts} (experts are routed to rank "
                             "e // num_local_experts)")
        counters = getattr(self, "counters", None)
        if counters is not None and (num_experts, num_local_experts) != (
                self.num_experts, self.num_local_experts):
            # the per-expert counts so far are of the old slots: added to the new layout's they
            # would name other experts (and fail on a new slot count). The placement was made
            # from them already; the traffic byte counts stay
            counters.tokens_per_expert = None
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
    """x [T, h] -> rows [T*k, h] = x[token], token = order // k: each token's k copies in expert
    order.

    The backward adds each row's gradient into its token (one pass over the rows; each token's k
    terms are added in row order), instead of gathering the rows back into (token, choice) order
    and summing (a second [T*k, h] tensor and a second pass)."""

    @staticmethod
    def forward(ctx, x, token):
        ctx.save_for_backward(token)
        ctx.tokens = x.shape[0]
        rows = workspace.empty((token.numel(), x.shape[-1]), x.dtype, x.device)
        return torch.index_select(x, 0, token, out=rows)

    @staticmethod
    def backward(ctx, g):
        (token,) = ctx.saved_tensors
        return g.new_zeros(ctx.tokens, g.shape[-1]).index_add_(0, token, g), None


def _combine_matrix(weights, inverse, n_rows):
    """The combine as a sparse [T, n_rows] CSR matrix: row t holds weights[t, j] at column
    inverse[t*k + j], so out = C @ rows is each token's weighted sum. CSR wants each row's columns
    increasing: each token's k entries are sorted by column -> (matrix, perm), perm [T, k] the
    choice j at each sorted place."""
    T, k = weights.shape
    cols, perm = inverse.view(T, k).sort(dim=1)
    crow = torch.arange(0, T * k + 1, k, device=weights.device)
    vals = weights.gather(1, perm).reshape(-1)
    return torch.sparse_csr_tensor(crow, cols.reshape(-1), vals, size=(T, n_rows),
                                   check_invariants=False), perm


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """What routing weights and combine sums are kept in: float32, or the tokens' dtype where it
    is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def _sparse_combine_runs(rows, weights) -> bool:
    """torch's CSR x dense product (MKL on CPU) takes float32/float64 only."""
    return (rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64)
            and weights.dtype == rows.dtype)


class _Combine(torch.autograd.Function):
    """out[t] = sum_j weights[t, j] * rows[inverse[t*k + j]], in float32 (or wider): each token's
    weighted sum over its k expert rows.

    On CPU in float32/float64 the forward is one sparse x dense product (`_combine_matrix`): each
    row is read once where it lies and nothing of size [T*k, h] is written. Otherwise the rows are
    gathered into (token, choice) order and each token takes a batched [1, k] x [k, h] product.
    Backward, in the rows' expert order: the output gradient of each row's token, gathered once
    and scaled in place by the row's weight, is the rows' gradient; the weights' gradient is each
    row's dot product with its token's output gradient (`sampled_addmm` at the combine pattern,
    or a batched dot product on the gather path)."""

    @staticmethod
    def forward(ctx, rows, weights, order, inverse):
        T, k = weights.shape
        acc = combine_dtype(rows.dtype)
        ctx.save_for_backward(rows, weights, order, inverse)
        ctx.acc = acc
        ctx.matrix = None  # (the CSR matrix and its choice order, kept for backward's pattern)
        if _sparse_combine_runs(rows, weights):
            ctx.matrix, ctx.perm = _combine_matrix(weights, inverse, rows.shape[0])
            return torch.sparse.mm(ctx.matrix, rows)
        y = rows.index_select(0, inverse).view(T, k, rows.shape[-1]).to(acc)
        return torch.bmm(weights.to(acc).unsqueeze(1), y).squeeze(1).to(rows.dtype)

    @staticmethod
    def backward(ctx, g):
        rows, weights, order, inverse = ctx.saved_tensors
        T, k = weights.shape
        acc = ctx.acc
        g = g.to(acc).contiguous()
        d_weights = None
        if ctx.needs_input_grad[1]:
            if ctx.matrix is not None:  # its values are ignored (beta=0): only the pattern
                dots = torch.sparse.sampled_addmm(ctx.matrix, g, rows.t(), beta=0.0).values()
                d_weights = torch.empty_like(dots).view(T, k).scatter_(1, ctx.perm,
                                                                       dots.view(T, k))
            else:
                y = rows.index_select(0, inverse).view(T, k, rows.shape[-1]).to(acc)
                d_weights = torch.bmm(y, g.unsqueeze(-1))
            d_weights = d_weights.reshape(T, k).to(weights.dtype)
        d_rows = None
        if ctx.needs_input_grad[0]:
            token = torch.div(order, k, rounding_mode="floor")
            w_sorted = weights.reshape(-1).index_select(0, order).to(acc)
            d_rows = workspace.empty((token.numel(), g.shape[-1]), acc, g.device)
            torch.index_select(g, 0, token, out=d_rows).mul_(w_sorted.unsqueeze(1))
            d_rows = d_rows.to(rows.dtype)
        return d_rows, d_weights, None, None


class LocalDispatcher(TokenDispatcher):
    """All experts on this rank (no expert parallelism): a permutation and its inverse.

    Dispatch copies each token to its k expert-sorted rows (a gather; its backward adds the rows'
    gradients back into their tokens); combine takes each token's weighted sum over its k rows in
    float32 or wider (`_Combine`)."""

    def __init__(self, num_experts: int):
        super().__init__(num_experts, None)

    def dispatch(self, x, indices, weights):
        k = indices.shape[1]
        order, counts = sort_by_expert(indices, self.num_experts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        state = DispatchState(order, inverse, weights)
        token = torch.div(order, k, rounding_mode="floor")
        return _ExpandSorted.apply(x, token), counts.tolist(), state

    def combine(self, expert_output, state: DispatchState):
        return _Combine.apply(expert_output, state.weights, state.order, state.inverse)
