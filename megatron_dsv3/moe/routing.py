"""DeepSeek-V3 routing as pure functions (no module state, no communication).

    s = sigmoid(logits)                       (float32)
    b = s + expert_bias                       (selection only; the bias gets no gradient)
    group score = sum of the top-2 b in each group; keep the `group_topk` best groups
    indices = top-k of b over the kept groups
    weights = s[indices] / (sum(s[indices]) + 1e-20) * scaling_factor
              (top-1: s[indices] * scaling_factor, as Megatron's router)

With experts grouped by node (groups = nodes), keeping `group_topk` groups is node-limited
routing: a token reaches at most `group_topk` nodes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def check_routing_args(num_experts: int, topk: int, num_groups: int, group_topk: int) -> None:
    """ValueError naming the argument and its allowed values for a routing the math cannot do."""
    if num_groups <= 0 or num_experts % num_groups:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(f"num_groups={num_groups} must divide the {num_experts} experts; "
                         f"allowed values: {divisors}")
    if not 1 <= group_topk <= num_groups:
        raise ValueError(f"group_topk={group_topk} is invalid: allowed values are 1..{num_groups}")
    kept = group_topk * (num_experts // num_groups)
    if not 1 <= topk <= kept:
        raise ValueError(f"topk={topk} is invalid: the {group_topk} kept groups hold {kept} "
                         f"experts; allowed values are 1..{kept}")


def group_limited_mask(biased: torch.Tensor, num_groups: int, group_topk: int) -> torch.Tensor:
    """Bool mask [T, E], True for experts in each token's `group_topk` best groups."""
    T, E = biased.shape
    if num_groups == 1:
        return torch.ones_like(biased, dtype=torch.bool)
    grouped = biased.view(T, num_groups, E // num_groups)
    top = min(2, E // num_groups)
    group_scores = grouped.topk(top, dim=-1).values.sum(dim=-1)  # [T, G]
    kept = group_scores.topk(group_topk, dim=-1).indices  # [T, group_topk]
    group_mask = torch.zeros(T, num_groups, dtype=torch.bool, device=biased.device)
    group_mask.scatter_(1, kept, True)
    return group_mask.repeat_interleave(E // num_groups, dim=1)


def route(logits: torch.Tensor, expert_bias: Optional[torch.Tensor], *, topk: int,
          num_groups: int = 1, group_topk: Optional[int] = None,
          scaling_factor: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route T tokens over E experts: logits [T, E] -> (weights [T, topk] float32 (or float64), indices [T, topk]).

    `weights` carries gradient to `logits`; `indices` do not.
    """
    T, E = logits.shape
    group_topk = num_groups if group_topk is None else group_topk
    check_routing_args(E, topk, num_groups, group_topk)
    # at least float32 (float64 inputs stay float64)
    scores = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    with torch.no_grad():
        biased = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
        mask = group_limited_mask(biased, num_groups, group_topk)
        indices = biased.masked_fill(~mask, float("-inf")).topk(topk, dim=-1).indices
    weights = scores.gather(1, indices)
    # + 1e-20 (as transformers' and Megatron's sigmoid routers): a token whose chosen experts'
    # scores all underflow to 0 gets weights 0, not 0/0 = NaN; with any score above ~1e-13
    # the sum absorbs it exactly in float32
    if topk > 1:
        # (top-1 as Megatron's sigmoid router: not normalised, or every weight would be the
        # constant scaling factor and the gate would learn nothing from the loss)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, indices


def tokens_per_expert(indices: torch.Tensor, num_experts: int,
                      valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many (valid) tokens chose each expert: [E] float32."""
    flat = indices if valid is None else indices[valid]
    return torch.bincount(flat.flatten(), minlength=num_experts).float()
