"""Routed experts on Transformer Engine's grouped GEMM (the 'te' GEMM backend).

The same interface, experts and checkpoints as `GroupedExperts`: forward(rows sorted by local
expert, tokens_per_expert) -> [N, h]; each expert's fc1 [2F, h] ([gate; up]) and fc2 [h, F]
drawn from its own keyed generator; `sharded_state_dict` writes the same global [E, 2F, h] /
[E, h, F] tensors (`fc1_weight`, `fc2_weight`), one shard per local expert, and the plain
state dict carries the same stacked `fc1_weight` / `fc2_weight` keys, so a checkpoint moves
between the backends unchanged.

The GEMMs are `te.pytorch.GroupedLinear` (TE's documented API: GroupedLinear(num_gemms,
in_features, out_features, bias=..., params_dtype=..., device=..., init_method=...), forward(inp,
m_splits)); with the FP8 recipe they run in FP8 under the `te.pytorch.autocast` that
`megatron_dsv3.fp8.te_autocast.te_fp8_autocast(config)` enters around the layers. TE is imported
when the module is built, never at import time.

Not covered on this backend: zero-bubble deferral of the experts' weight gradients through our
WeightGradStore (TE computes them in the backward pass), and redundant-expert placement
(`moe.eplb.apply_placement`), which re-lays GroupedExperts' stacked weights.
"""

from __future__ import annotations

from typing import List

import torch

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule

from megatron_dsv3.core.init import param_device
from megatron_dsv3.core.mlp import swiglu
from megatron_dsv3.core.recompute import recompute_region
from megatron_dsv3.moe.experts import expert_replica_id, init_expert_weights
from megatron_dsv3.upstream_flags import fp8_on

STACKED = ("fc1_weight", "fc2_weight")
# TE's FP8 block-scaling grouped GEMM takes per-GEMM row counts that are multiples of 16
# (cublaslt_gemm.cu: "Caller must pad"; TE's get_align_size_for_quantization, Megatron's
# Fp8Padding): under an FP8 recipe each expert's rows are padded with zero rows to that.
FP8_ALIGN = 16


def _transformer_engine():
    try:
        import transformer_engine.pytorch as te
    except Exception as error:  # ImportError, OSError for missing CUDA libraries, ...
        raise ImportError(
            "TEGroupedExperts needs Transformer Engine (transformer_engine.pytorch), which does "
            f"not import here ({type(error).__name__}: {error}); set dsv3_gemm_backend to "
            "'emulated' or 'torch' (megatron_dsv3.fp8.backends lists what runs here)") from error
    return te


def _keep_initialisation(weight: torch.Tensor) -> None:
    """init_method for TE: ours follows (keyed per expert), TE draws nothing."""


class TEGroupedExperts(MegatronModule):
    """Routed experts as two TE GroupedLinear layers (fc1: h -> 2F, fc2: F -> h), SwiGLU between."""

    def __init__(self, config, num_local_experts: int, local_expert_offset: int = 0,
                 key: str = "experts", pg_collection=None, **_unused):
        super().__init__(config=config)
        te = _transformer_engine()
        self.num_local_experts = num_local_experts
        self.local_expert_offset = local_expert_offset
        self.expt_dp_group = getattr(pg_collection, "expt_dp", None)
        h, f = config.hidden_size, config.moe_ffn_hidden_size
        common = dict(bias=False, params_dtype=config.params_dtype, device=param_device(config),
                      init_method=_keep_initialisation)
        self.linear_fc1 = te.GroupedLinear(num_local_experts, h, 2 * f, **common)
        self.linear_fc2 = te.GroupedLinear(num_local_experts, f, h, **common)
        for p in self.parameters():
            setattr(p, "allreduce", False)  # expert parameter: reduced over expert-data-parallel
        if config.perform_initialization:
            init_expert_weights(config, self.expert_weights("fc1"), self.expert_weights("fc2"),
                                key, local_expert_offset)
        # an FP8 recipe of ours or Megatron's drives TE's GEMMs: row counts padded for them
        self.align = FP8_ALIGN if fp8_on(config) else 1
        self._register_state_dict_hook(_stack_expert_weights)
        self._register_load_state_dict_pre_hook(_split_expert_weights, with_module=True)

    def expert_weights(self, which: str) -> List[torch.nn.Parameter]:
        """The local experts' weights of 'fc1' or 'fc2', expert by expert (TE's weight0..)."""
        layer = self.linear_fc1 if which == "fc1" else self.linear_fc2
        return [getattr(layer, f"weight{e}") for e in range(self.num_local_experts)]

    def forward(self, rows: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
        """rows [N, h] sorted by local expert -> [N, h]."""
        m_splits = [int(n) for n in tokens_per_expert]
        real = None
        if self.align > 1 and any(n % self.align for n in m_splits):
            # zero rows after each expert's: they give zero outputs and add nothing to any
            # gradient; only the real rows are handed back
            padded = [-(-n // self.align) * self.align for n in m_splits]
            starts = [sum(padded[:e]) for e in range(len(padded))]
            real = torch.cat([torch.arange(n, device=rows.device) + s
                              for n, s in zip(m_splits, starts)])
            rows = rows.new_zeros(sum(padded), rows.shape[1]).index_copy(0, real, rows)
            m_splits = padded
        h = self.linear_fc1(rows, m_splits)
        act, release = recompute_region(self.config, "moe_act", swiglu)
        a = act(h)
        out = self.linear_fc2(a, m_splits)
        release(out)
        return out if real is None else out.index_select(0, real)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """GroupedExperts' global tensors (`fc1_weight` [E, 2F, h], `fc2_weight` [E, h, F]), one
        shard per local expert at its global expert index."""
        replica_id = expert_replica_id(self.expt_dp_group)
        total = self.config.num_moe_experts
        out = {}
        for name, which in zip(STACKED, ("fc1", "fc2")):
            key = f"{prefix}{name}"  # the checkpoint's tensor; dict entries per local expert
            for e, w in enumerate(self.expert_weights(which)):
                out[f"{key}.{e}"] = ShardedTensor.from_rank_offsets(
                    key, w, *sharded_offsets,
                    (len(sharded_offsets), self.local_expert_offset + e, total),
                    replica_id=replica_id, prepend_axis_num=len(sharded_offsets) + 1)
        return out


def _stack_expert_weights(module: TEGroupedExperts, state_dict, prefix, local_metadata):
    """state_dict hook: linear_fcX.weight0.. -> the stacked fcX_weight of GroupedExperts."""
    for name, which in zip(STACKED, ("fc1", "fc2")):
        layer = f"{prefix}linear_{which}."
        parts = [state_dict.pop(f"{layer}weight{e}") for e in range(module.num_local_experts)]
        state_dict[f"{prefix}{name}"] = torch.stack(parts)
        for k in [k for k in state_dict if k.startswith(layer)]:  # TE's extra state, if any
            state_dict.pop(k)
    return state_dict


def _split_expert_weights(module: TEGroupedExperts, state_dict, prefix, local_metadata, strict,
                          missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: a stacked fcX_weight (a plain state dict of either backend), or
    fcX_weight.<e> entries (what a distributed checkpoint loads back for `sharded_state_dict`)
    -> linear_fcX.weight<e>; TE's extra state is not required."""
    for name, which in zip(STACKED, ("fc1", "fc2")):
        stacked = state_dict.pop(f"{prefix}{name}", None)
        per_expert = [state_dict.pop(f"{prefix}{name}.{e}", None)
                      for e in range(module.num_local_experts)]
        if stacked is None and all(w is None for w in per_expert):
            continue
        for e in range(module.num_local_experts):
            w = stacked[e] if stacked is not None else per_expert[e]
            if w is not None:
                state_dict[f"{prefix}linear_{which}.weight{e}"] = w
        layer = getattr(module, f"linear_{which}")
        for k, v in layer.state_dict(keep_vars=True).items():
            if not k.startswith("weight"):  # e.g. TE's _extra_state: keep the module's own
                state_dict.setdefault(f"{prefix}linear_{which}.{k}", v)
