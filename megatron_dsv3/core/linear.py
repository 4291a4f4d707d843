"""Tensor-parallel linear layers whose GEMMs go through `core.gemm` (FP8, deferred wgrad).

Constructor and return convention follow Megatron's ColumnParallelLinear/RowParallelLinear, so a
spec may swap in Megatron's or Transformer Engine's classes; `init_method` may be a `KeyedInit`,
which gives every layout the same initial weights. `gemm` is a factory config -> Gemm that the
spec passes in (layer_specs.gemm_strategy, e.g. FP8); without it the GEMMs are plain.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_dsv3.core.gemm import DEFAULT_GEMM, Gemm, linear
from megatron_dsv3.core.init import init_normal_, param_device
from megatron_dsv3.upstream_flags import megatron_lm_args


def tp_group_or_default(tp_group):
    if tp_group is not None:
        return tp_group
    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def _dp_group():
    """The data-parallel group whose members hold replicas (None before parallel_state)."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True,
                                                  partial_data_parallel=False) \
        if parallel_state.model_parallel_is_initialized() else None


def group_size(group) -> int:
    return group.size() if group is not None else 1


def group_rank(group) -> int:
    return group.rank() if group is not None else 0


class KeyedInit:
    """An init_method that draws the full tensor `key` from its own generator and keeps this
    rank's slice; see `core.init`. Works on a local shard, whoever allocates it (ours or TE)."""

    def __init__(self, config, key: str, full_shape, partition_dim: int = 0, tp_group=None):
        self.std, self.seed, self.key = config.init_method_std, init_seed_of(config), key
        self.full_shape, self.dim, self.tp_group = tuple(full_shape), partition_dim, tp_group

    def __call__(self, weight: torch.Tensor) -> None:
        init_normal_(weight, std=self.std, seed=self.seed, key=self.key, full_shape=self.full_shape,
                     dim=self.dim, rank=group_rank(self.tp_group))


def init_seed_of(config) -> int:
    """`init_seed` of our config. Megatron-LM's plain config (pretrain_gpt.py --spec
    megatron_dsv3...) has none: its --seed, as Megatron's own layers draw their initial weights
    after seeding with it (1234, Megatron-LM's default, outside Megatron-LM's training code)."""
    seed = getattr(config, "init_seed", None)
    if seed is None:
        seed = getattr(megatron_lm_args(), "seed", None)
    return 1234 if seed is None else seed


class _ParallelLinear(MegatronModule):
    partition_dim = 0
    replicated = False

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Optional[Callable],
                 bias: bool = False, skip_bias_add: bool = False, is_expert: bool = False,
                 tp_group=None, gemm: Optional[Callable[..., Gemm]] = None,
                 **_megatron_kwargs):
        super().__init__(config=config)
        self.tp_group = None if self.replicated else tp_group_or_default(tp_group)
        tp = group_size(self.tp_group)
        self.input_size, self.output_size = input_size, output_size
        full = (output_size, input_size)
        local = list(full)
        if full[self.partition_dim] % tp:
            raise ValueError(f"{type(self).__name__}: size {full[self.partition_dim]} is not "
                             f"divisible by tensor_model_parallel_size={tp}")
        local[self.partition_dim] //= tp
        device = param_device(config)
        self.weight = torch.nn.Parameter(torch.empty(local, dtype=config.params_dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, tp > 1, self.partition_dim, 1)
        setattr(self.weight, "allreduce", not is_expert)
        if init_method is not None and config.perform_initialization:
            init_method(self.weight)
        self.skip_bias_add = skip_bias_add
        if bias:
            n = local[0]
            self.bias = torch.nn.Parameter(torch.zeros(n, dtype=config.params_dtype, device=device))
            set_tensor_model_parallel_attributes(self.bias, tp > 1 and self.partition_dim == 0, 0, 1)
            setattr(self.bias, "allreduce", not is_expert)
        else:
            self.register_parameter("bias", None)
        self.gemm = gemm(config) if gemm is not None else DEFAULT_GEMM

    def _bias_out(self, out):
        if self.bias is None:
            return out, None
        if self.skip_bias_add:
            return out, self.bias
        return out + self.bias, None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axis = {"weight": self.partition_dim}
        if self.partition_dim == 0:
            axis["bias"] = 0
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, axis, sharded_offsets,
                                                   tp_group=self.tp_group,
                                                   dp_cp_group=_dp_group())


class ColumnParallelLinear(_ParallelLinear):
    """Output features split over tensor-parallel ranks; the input is replicated."""

    partition_dim = 0

    def __init__(self, input_size, output_size, *, config, init_method=None, gather_output=False,
                 **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None, **_unused):
        tp = group_size(self.tp_group)
        if tp > 1:
            x = mappings.copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        out = linear(x, self.weight if weight is None else weight, self.gemm)
        if self.gather_output and tp > 1:
            out = mappings.gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return self._bias_out(out)


class RowParallelLinear(_ParallelLinear):
    """Input features split over tensor-parallel ranks; partial outputs are all-reduced."""

    partition_dim = 1

    def __init__(self, input_size, output_size, *, config, init_method=None,
                 input_is_parallel=True, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
        if not input_is_parallel:
            raise ValueError("RowParallelLinear: input_is_parallel=False is not supported "
                             "(allowed values: True)")

    def forward(self, x: torch.Tensor, **_unused):
        out = linear(x, self.weight, self.gemm)
        if group_size(self.tp_group) > 1:
            out = mappings.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return self._bias_out(out)


class ReplicatedLinear(ColumnParallelLinear):
    """The same full weight on every tensor-parallel rank (MLA's down-projections, the router).

    Its input gradient is complete on each rank as long as its output feeds a column-parallel
    layer (which all-reduces input gradients); its weight gradient is then identical across ranks.
    """

    replicated = True

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(check_initialized=False),
            dp_cp_group=_dp_group())
