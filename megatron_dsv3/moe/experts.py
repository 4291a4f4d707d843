"""Routed experts: SwiGLU over grouped GEMMs on the rows a dispatcher sorted by expert.

Weights are stacked per local expert: `fc1_weight` [E_local, 2F, h] ([gate; up] of each expert,
like a linear layer's [out, in]) and `fc2_weight` [E_local, h, F]. Expert e of this rank is global
expert `local_expert_offset + e`; each expert draws its initial weights from its own keyed
generator, so any expert-parallel layout starts from the same experts.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule

from megatron_dsv3.core.gemm import DEFAULT_GEMM, Gemm
from megatron_dsv3.core.grouped_gemm import grouped_linear
from megatron_dsv3.core.init import init_normal_, param_device
from megatron_dsv3.core.linear import init_seed_of
from megatron_dsv3.core.mlp import swiglu
from megatron_dsv3.core.recompute import recompute_region


def init_expert_weights(config, fc1: List[torch.Tensor], fc2: List[torch.Tensor], key: str,
                        local_expert_offset: int) -> None:
    """Each local expert's fc1 [2F, h] ([gate; up]) and fc2 [h, F] from its own keyed generator
    (global expert number local_expert_offset + e): the same experts on every backend and
    expert-parallel layout."""
    seed, std, f = init_seed_of(config), config.init_method_std, config.moe_ffn_hidden_size
    for e, (w1, w2) in enumerate(zip(fc1, fc2)):
        name = f"{key}.{local_expert_offset + e}"
        init_normal_(w1[:f], std=std, seed=seed, key=f"{name}.fc1.gate")
        init_normal_(w1[f:], std=std, seed=seed, key=f"{name}.fc1.up")
        init_normal_(w2, std=std, seed=seed, key=f"{name}.fc2")


def expert_replica_id(expt_dp_group) -> tuple:
    """ShardedTensor replica id of this rank's experts: replicas are the expert-data-parallel
    copies of the same experts, so a checkpoint does not depend on the layout that wrote it."""
    group = expt_dp_group or parallel_state.get_expert_data_parallel_group(
        check_initialized=False)
    return (0, 0, group.rank() if group is not None else 0)


PLACED_NO_CHECKPOINT = (
    "these experts were re-laid with redundant replicas (megatron_dsv3.moe.eplb.apply_placement), "
    "which is for serving: checkpoint the model before applying a placement")


class GroupedExperts(MegatronModule):
    """`gemm`: the GEMM strategy factory, config -> Gemm, of fc1 and fc2 (the spec's param, from
    layer_specs.gemm_strategy; None: plain GEMMs)."""

    def __init__(self, config, num_local_experts: int, local_expert_offset: int = 0,
                 key: str = "experts", pg_collection=None,
                 gemm: Optional[Callable[..., Gemm]] = None, **_unused):
        super().__init__(config=config)
        self.num_local_experts = num_local_experts
        self.local_expert_offset = local_expert_offset
        self.expt_dp_group = getattr(pg_collection, "expt_dp", None)
        h, f = config.hidden_size, config.moe_ffn_hidden_size
        device = param_device(config)
        self.fc1_weight = torch.nn.Parameter(
            torch.empty(num_local_experts, 2 * f, h, dtype=config.params_dtype, device=device))
        self.fc2_weight = torch.nn.Parameter(
            torch.empty(num_local_experts, h, f, dtype=config.params_dtype, device=device))
        for p in (self.fc1_weight, self.fc2_weight):
            setattr(p, "allreduce", False)  # expert parameter: reduced over expert-data-parallel
        if config.perform_initialization:
            with torch.no_grad():  # (unbound views of a Parameter, filled in place)
                init_expert_weights(config, list(self.fc1_weight), list(self.fc2_weight), key,
                                    local_expert_offset)
        self.gemm = gemm(config) if gemm is not None else DEFAULT_GEMM
        self.register_state_dict_pre_hook(GroupedExperts._refuse_plain_state_dict_when_placed)

    def _refuse_plain_state_dict_when_placed(self, *_args, **_kwargs):
        """state_dict() pre-hook: a placed stack holds physical slots (replicas, experts moved
        across ranks), which a plain state dict would write as if they were the logical experts
        (a reload then silently permutes them)."""
        if getattr(self, "placed", False):
            raise ValueError(PLACED_NO_CHECKPOINT)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The global [E, ...] stacks, this rank's experts at rows [offset, offset + E_local).

        Replicas are the expert-data-parallel copies of the same experts, so the checkpoint does
        not depend on the expert-parallel layout that wrote it. `sharded_offsets` (a layer axis
        Megatron prepends for homogeneous blocks) come first.
        """
        if getattr(self, "placed", False):
            raise ValueError(PLACED_NO_CHECKPOINT)
        replica_id = expert_replica_id(self.expt_dp_group)
        expert_axis = (len(sharded_offsets), self.local_expert_offset // self.num_local_experts,
                       self.config.num_moe_experts // self.num_local_experts)
        return {f"{prefix}{name}": ShardedTensor.from_rank_offsets(
                    f"{prefix}{name}", param, *sharded_offsets, expert_axis,
                    replica_id=replica_id, prepend_axis_num=len(sharded_offsets))
                for name, param in (("fc1_weight", self.fc1_weight),
                                    ("fc2_weight", self.fc2_weight))}

    def forward(self, rows: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
        """rows [N, h] sorted by local expert -> [N, h]."""
        h = grouped_linear(rows, self.fc1_weight, tokens_per_expert, self.gemm)
        act, release = recompute_region(self.config, "moe_act", swiglu)
        a = act(h)
        out = grouped_linear(a, self.fc2_weight, tokens_per_expert, self.gemm)
        release(out)
        return out
