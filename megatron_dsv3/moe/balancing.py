"""Load balancing: the auxiliary-loss-free expert bias and the sequence-wise auxiliary loss."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def updated_expert_bias(load: torch.Tensor, bias: torch.Tensor, rate: float) -> torch.Tensor:
    """bias_i + rate * sign(mean_load - load_i): overloaded experts become less attractive.

    `load` [..., E] counts tokens over the global batch; leading dims batch several layers.
    """
    mean = load.mean(dim=-1, keepdim=True)
    return bias + rate * torch.sign(mean - load)


def sequence_aux_loss(scores: torch.Tensor, indices: torch.Tensor, *, seq_len: int, topk: int,
                      valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i, averaged over sequences (coefficient applied by
    the caller).

    scores [T, E] are the sigmoid affinities of tokens laid out [s, b] (Megatron's order, token
    t*b + j is position t of sequence j); f_i = E / (topk * s) * (#tokens of the sequence routed to
    i); P_i = mean over the sequence of the normalised affinity s_i / sum_j s_j. Padding tokens
    (valid == False) count in neither.
    """
    T, E = scores.shape
    b = T // seq_len
    normed = scores / scores.sum(dim=-1, keepdim=True)
    chosen = torch.zeros(T, E, device=scores.device, dtype=scores.dtype)
    chosen.scatter_(1, indices, 1.0)
    weight = (torch.ones(T, 1, device=scores.device, dtype=scores.dtype) if valid is None
              else valid.reshape(T, 1).to(scores.dtype))
    per_seq_tokens = weight.view(seq_len, b, 1).sum(0).clamp_min(1.0)  # [b, 1]
    f = (chosen * weight).view(seq_len, b, E).sum(0) * E / (topk * per_seq_tokens)  # [b, E]
    p = (normed * weight).view(seq_len, b, E).sum(0) / per_seq_tokens  # [b, E]
    return (f.detach() * p).sum(-1).mean()


def routers_of(modules: Iterable[torch.nn.Module]):
    """Every router with an aux-loss-free bias in the given model chunks."""
    for chunk in modules:
        for module in chunk.modules():
            if getattr(module, "expert_bias", None) is not None and hasattr(
                    module, "local_tokens_per_expert"):
                yield module


@torch.no_grad()
def update_expert_biases(model_chunks, rate: float, group=None) -> None:
    """After an optimizer step: all-reduce each router's token counts over `group` (the ranks
    that saw different tokens of the global batch), update its bias, reset its counts.

    Megatron-LM's training loop does the same in finalize_model_grads for modules with
    `expert_bias` and `local_tokens_per_expert`, which our router provides.
    """
    routers = list(routers_of(model_chunks))
    if not routers:
        return
    loads = torch.stack([r.local_tokens_per_expert for r in routers])
    if group is not None and torch.distributed.is_initialized() and group.size() > 1:
        torch.distributed.all_reduce(loads, group=group)
    for router, load in zip(routers, loads):
        router.expert_bias.copy_(updated_expert_bias(load, router.expert_bias, rate))
        router.local_tokens_per_expert.zero_()
