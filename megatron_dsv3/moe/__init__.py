"""DeepSeek-MoE: sigmoid group-limited routing, aux-loss-free bias balancing, sequence-wise aux
loss, shared expert and grouped-GEMM routed experts behind a dispatcher interface."""

import importlib

from megatron_dsv3.moe.balancing import sequence_aux_loss, update_expert_biases, updated_expert_bias
from megatron_dsv3.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules
from megatron_dsv3.moe.routing import route

# imported on first use: the router and the experts build on megatron_dsv3.core
_LAZY = {"SigmoidGroupRouter": "router", "GroupedExperts": "experts"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DeepSeekMoE", "DeepSeekMoESubmodules", "route", "sequence_aux_loss",
           "update_expert_biases", "updated_expert_bias", *_LAZY]
