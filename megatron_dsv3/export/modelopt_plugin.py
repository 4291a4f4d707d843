"""Our modules registered with nvidia-modelopt's quantisation registry (QuantModuleRegistry).

modelopt's Megatron plugin converts megatron-core's own ColumnParallelLinear / RowParallelLinear /
TE modules; ours are different classes (core.linear, moe.experts.GroupedExperts), so `mtq.quantize`
would leave them alone. `register()` teaches modelopt both:

- our linears (Column/Row/Replicated): modelopt's quantised-linear base. Their forward reads
  `self.weight`, which modelopt turns into the weight quantiser's output while the module runs, and
  the input goes through `input_quantizer` first: `linear(Q_in(x), Q_w(W))`. AWQ and SmoothQuant
  see them as linears (2-D weight, input and weight quantisers).
- GroupedExperts (stacked [E, out, in] weights): one weight quantiser per expert and projection
  (`fc1_weight_quantizers[e]`, `fc2_weight_quantizers[e]`: each expert gets its own scales, as if
  it were its own linear) and one input quantiser per projection shared by all experts
  (`fc1_input_quantizer`, `fc2_input_quantizer`: one activation scale per projection, what
  grouped-GEMM serving kernels take). Quantiser names follow modelopt's conventions
  (`*weight_quantizer`/`*input_quantizer`, plural lists for experts), so every stock config's
  wildcards reach them.

Imported only by the export path: modelopt is the optional `[deploy]` extra.
"""

from __future__ import annotations

import torch

from megatron_dsv3.core.grouped_gemm import grouped_linear
from megatron_dsv3.core.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from megatron_dsv3.core.mlp import swiglu
from megatron_dsv3.core.recompute import recompute_region
from megatron_dsv3.moe.experts import GroupedExperts

PROJECTIONS = ("fc1", "fc2")


def _classes():
    from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QuantLinearConvBase

    class QuantParallelLinear(QuantLinearConvBase):
        """Input and weight quantisers around our tensor-parallel linears."""

        def _setup(self):
            super()._setup()
            # the groups modelopt reduces calibration statistics over (amax of replicated
            # inputs/weights across data-parallel ranks, of the sharded ones across TP)
            self.parallel_state = _parallel_state(getattr(self, "tp_group", None), expert=False)

    class QuantGroupedExperts(QuantModule):
        """Per-expert weight quantisers, one shared input quantiser per projection."""

        def _setup(self):
            self.parallel_state = _parallel_state(None, expert=True)
            n = self.num_local_experts
            for proj in PROJECTIONS:
                self._register_temp_attribute(f"{proj}_input_quantizer", TensorQuantizer())
                self._register_temp_attribute(
                    f"{proj}_weight_quantizers",
                    torch.nn.ModuleList(TensorQuantizer() for _ in range(n)))

        def quantized_weight(self, proj: str) -> torch.Tensor:
            """The [E, out, in] stack, each expert through its own weight quantiser."""
            weight = getattr(self, f"{proj}_weight")
            quantizers = getattr(self, f"{proj}_weight_quantizers")
            return torch.stack([q(w) for q, w in zip(quantizers, weight)])

        def forward(self, rows, tokens_per_expert):
            h = grouped_linear(self.fc1_input_quantizer(rows), self.quantized_weight("fc1"),
                               tokens_per_expert, self.gemm)
            act, release = recompute_region(self.config, "moe_act", swiglu)
            a = act(h)
            out = grouped_linear(self.fc2_input_quantizer(a), self.quantized_weight("fc2"),
                                 tokens_per_expert, self.gemm)
            release(out)
            return out

        def iter_weights_for_calibration(self):
            """(expert weight, its quantiser) pairs: weight-only calibration reaches every expert."""
            for proj in PROJECTIONS:
                yield from zip(getattr(self, f"{proj}_weight"),
                               getattr(self, f"{proj}_weight_quantizers"))

        def fold_weight(self, keep_attrs: bool = False):
            for weight, quantizer in self.iter_weights_for_calibration():
                if quantizer.fake_quant:
                    self._fold_weight_quantizer(quantizer, (weight,), keep_attrs)

    return QuantModuleRegistry, QuantParallelLinear, QuantGroupedExperts


def _parallel_state(tp_group, expert: bool):
    """modelopt's ParallelState from Megatron's groups (-1: not used, in a process without
    Megatron's parallel state)."""
    from megatron.core import parallel_state as mpu
    from modelopt.torch.utils.distributed import ParallelState

    if not mpu.model_parallel_is_initialized():
        return ParallelState(-1, -1, -1)
    if expert:
        return ParallelState(mpu.get_expert_data_parallel_group(),
                             tensor_parallel_group=mpu.get_expert_tensor_parallel_group(),
                             expert_model_parallel_group=mpu.get_expert_model_parallel_group())
    tp = tp_group if tp_group is not None else mpu.get_tensor_model_parallel_group()
    return ParallelState(mpu.get_data_parallel_group(with_context_parallel=True), tp)


_REGISTERED = False


def register() -> None:
    """Register our linears and routed experts with modelopt (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    registry, linear_cls, experts_cls = _classes()
    for cls in (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear):
        if cls not in registry:
            registry.register({cls: f"megatron_dsv3.{cls.__name__}"})(linear_cls)
    if GroupedExperts not in registry:
        registry.register({GroupedExperts: "megatron_dsv3.GroupedExperts"})(experts_cls)
    _REGISTERED = True
