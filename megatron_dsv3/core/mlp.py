"""SwiGLU feed-forward block: DeepSeek-V3's dense MLP and its shared expert.

y = W2 (silu(W_gate x) * (W_up x)); W_gate and W_up are fused into one column-parallel `linear_fc1`
whose local shard is [gate_r; up_r], W2 is the row-parallel `linear_fc2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_dsv3 import workspace
from megatron_dsv3.core.init import init_normal_
from megatron_dsv3.core.linear import KeyedInit, group_rank, group_size, tp_group_or_default
from megatron_dsv3.core.recompute import recompute_region


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of h = [gate | up]: the same kernels as autograd's graph of that formula
    (bitwise the same results, and the same tensors kept: h and silu(gate)), but the backward
    writes both halves' gradients straight into one [..., 2F] tensor, the gate's in place,
    instead of producing them apart and concatenating them."""

    @staticmethod
    def forward(ctx, h):
        gate, up = torch.chunk(h, 2, dim=-1)
        # (large CPU outputs come from reused memory: megatron_dsv3.workspace)
        act = workspace.empty(gate.shape, gate.dtype, gate.device)
        torch.ops.aten.silu.out(gate, out=act)
        ctx.save_for_backward(h, act)
        return torch.mul(act, up, out=workspace.empty(act.shape, act.dtype, act.device))

    @staticmethod
    def backward(ctx, g):
        h, act = ctx.saved_tensors
        gate, up = torch.chunk(h, 2, dim=-1)
        dh = workspace.empty(h.shape, h.dtype, h.device)
        d_gate, d_up = torch.chunk(dh, 2, dim=-1)
        torch.mul(g, up, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        torch.mul(g, act, out=d_up)
        return dh


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] on the last dimension."""
    return _SwiGLU.apply(h)


class GLUKeyedInit(KeyedInit):
    """Keyed init of a fused [gate; up] weight: gate and up are drawn as separate full tensors and
    each tensor-parallel rank keeps [gate_r; up_r]."""

    def __call__(self, weight: torch.Tensor) -> None:
        half = weight.shape[0] // 2
        full = (self.full_shape[0] // 2, self.full_shape[1])
        rank = group_rank(self.tp_group)
        for part, sub in (("gate", weight[:half]), ("up", weight[half:])):
            init_normal_(sub, std=self.std, seed=self.seed, key=f"{self.key}.{part}",
                         full_shape=full, dim=0, rank=rank)


@dataclass
class MLPSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


class SwiGLUMLP(MegatronModule):
    """Dense SwiGLU MLP. `ffn_hidden_size` defaults to config.ffn_hidden_size; `key` names the
    weights for keyed initialisation (e.g. "layers.0.mlp")."""

    def __init__(self, config, submodules: MLPSubmodules, ffn_hidden_size: int = None,
                 key: str = "mlp", tp_group=None, **_unused):
        super().__init__(config=config)
        ffn = ffn_hidden_size or config.ffn_hidden_size
        h = config.hidden_size
        tp_group = tp_group_or_default(tp_group)
        if ffn % group_size(tp_group):
            raise ValueError(f"FFN size {ffn} must be divisible by tensor_model_parallel_size="
                             f"{group_size(tp_group)}")
        self.linear_fc1 = build_module(
            submodules.linear_fc1, h, 2 * ffn, config=config,
            init_method=GLUKeyedInit(config, f"{key}.fc1", (2 * ffn, h), 0, tp_group),
            gather_output=False, bias=False, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="fc1", tp_group=tp_group)
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, h, config=config,
            init_method=KeyedInit(config, f"{key}.fc2", (h, ffn), 1, tp_group),
            bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="fc2", tp_group=tp_group)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """fc1's checkpoint tensor is [gate; up] whatever the tensor-parallel size: each rank's
        [gate_r; up_r] is saved as two pieces (Megatron's SwiGLU factory), so a checkpoint
        written with one TP size loads with any other."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}linear_fc1.weight"
        state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets)
        return state

    def forward(self, x: torch.Tensor, **_unused):
        h, _ = self.linear_fc1(x)
        act, release = recompute_region(self.config, "moe_act", swiglu)
        a = act(h)
        out, _ = self.linear_fc2(a)
        release(out)
        return out, None
