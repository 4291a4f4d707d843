"""The DeepSeek-V3 gate: a float32 linear, sigmoid group-limited routing, bias and load tracking."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.module import MegatronModule

from megatron_dsv3.core.init import init_normal_, param_device
from megatron_dsv3.core.linear import init_seed_of
from megatron_dsv3.moe.balancing import sequence_aux_loss
from megatron_dsv3.moe.routing import route, tokens_per_expert


class SigmoidGroupRouter(MegatronModule):
    """weight [E, h] (kept in float32 math); buffers `expert_bias` [E] (aux-loss-free balancing,
    checkpointed) and `local_tokens_per_expert` [E] (loads since the last bias update) — the names
    Megatron-LM's finalize_model_grads looks for when it updates expert biases."""

    def __init__(self, config, key: str = "gate", **_unused):
        super().__init__(config=config)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.num_groups = config.moe_router_num_groups or 1
        self.group_topk = config.moe_router_group_topk or self.num_groups
        self.scaling_factor = config.moe_router_topk_scaling_factor or 1.0
        coeff = config.moe_aux_loss_coeff
        self.aux_loss_coeff = float(coeff[0] if isinstance(coeff, (list, tuple)) else coeff or 0.0)
        device = param_device(config)
        self.weight = torch.nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32, device=device))
        setattr(self.weight, "sequence_parallel", False)
        if config.perform_initialization:
            init_normal_(self.weight, std=config.init_method_std, seed=init_seed_of(config),
                         key=f"{key}.weight")
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32,
                                                            device=device))
        else:
            self.expert_bias = None
        self.register_buffer("local_tokens_per_expert",
                             torch.zeros(self.num_experts, dtype=torch.float32, device=device),
                             persistent=False)
        self.last_aux_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, seq_len: int, valid: Optional[torch.Tensor] = None):
        """x [T, h] (tokens in [s, b] order) -> (weights [T, k] float32, indices [T, k], aux_loss)."""
        logits = x.float() @ self.weight.t()
        weights, indices = route(logits, self.expert_bias, topk=self.topk,
                                 num_groups=self.num_groups, group_topk=self.group_topk,
                                 scaling_factor=self.scaling_factor)
        aux_loss = None
        if self.training:
            with torch.no_grad():
                self.local_tokens_per_expert += tokens_per_expert(indices, self.num_experts, valid)
            if self.aux_loss_coeff > 0 and torch.is_grad_enabled():
                aux_loss = self.aux_loss_coeff * sequence_aux_loss(
                    torch.sigmoid(logits), indices, seq_len=seq_len, topk=self.topk, valid=valid)
                self.last_aux_loss = aux_loss.detach()
        return weights, indices, aux_loss
