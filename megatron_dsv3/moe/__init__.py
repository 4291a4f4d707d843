"""DeepSeek-MoE: sigmoid group-limited routing, aux-loss-free bias balancing, sequence-wise aux
loss, shared expert and grouped-GEMM routed experts behind a dispatcher interface."""

from megatron_dsv3.lazy import lazy_attributes

from megatron_dsv3.moe.balancing import update_expert_biases, updated_expert_bias
from megatron_dsv3.moe.layer import DeepSeekMoE, DeepSeekMoESubmodules
from megatron_dsv3.moe.routing import route

# imported on first use: the router and the experts build on megatron_dsv3.core
_LAZY = {"SigmoidGroupRouter": "router", "load_balancing_loss": "router", "GroupedExperts": "experts"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = ["DeepSeekMoE", "DeepSeekMoESubmodules", "route",
           "update_expert_biases", "updated_expert_bias", *_LAZY]
