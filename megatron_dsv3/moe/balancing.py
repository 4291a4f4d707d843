"""Load balancing: the auxiliary-loss-free expert bias (the balancing losses are the router's:
`moe.router.load_balancing_loss`)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def updated_expert_bias(load: torch.Tensor, bias: torch.Tensor, rate: float) -> torch.Tensor:
    """bias_i + rate * sign(mean_load - load_i): overloaded experts become less attractive.

    `load` [..., E] counts tokens over the global batch; leading dims batch several layers.
    """
    mean = load.mean(dim=-1, keepdim=True)
    return bias + rate * torch.sign(mean - load)


def routers_of(modules: Iterable[torch.nn.Module]):
    """Every router with an aux-loss-free bias in the given model chunks."""
    for chunk in modules:
        for module in chunk.modules():
            if getattr(module, "expert_bias", None) is not None and hasattr(
                    module, "local_tokens_per_expert"):
                yield module


def last_balance_loss(modules: Iterable[torch.nn.Module]) -> float:
    """The router losses (the balancing losses and the z-loss, as they join the backward pass)
    the routers of the given model chunks computed in their last forward, summed: every
    router's, with an expert bias or without."""
    return sum(float(loss) for chunk in modules for module in chunk.modules()
               for loss in (getattr(module, "last_aux_loss", None),
                            getattr(module, "last_z_loss", None)) if loss is not None)


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
