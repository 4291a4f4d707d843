"""The dispatch payload in E4M3 with power-of-2 1x128 scales (DeepSeek-V3 section 3.3.4).

Quantised once at the source, the E4M3 bytes and their scales travel both stages unchanged and
are dequantised on the expert's rank. The backward (a combine of gradients) runs in the compute
dtype, as DeepSeek's BF16 combine: the quantisation is treated as identity for gradients.
"""

from __future__ import annotations

import torch

from megatron_dsv3.dispatch.comm import all_to_all
from megatron_dsv3.fp8.quant import dequantize_1x128, quantize_1x128


class _Fp8TwoStageDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s1, plan, topo):
        ctx.plan, ctx.topo, ctx.n1 = plan, topo, s1.shape[0]
        q, scale = quantize_1x128(s1, pow2_scales=True)
        payload = q.view(torch.uint8)
        r_q, _ = all_to_all(payload, plan.send1, plan.recv1, topo.rail_group)
        r_s, _ = all_to_all(scale, plan.send1, plan.recv1, topo.rail_group)
        f_q, f_s = r_q.index_select(0, plan.fwd_index), r_s.index_select(0, plan.fwd_index)
        q2, _ = all_to_all(f_q, plan.send2, plan.recv2, topo.node_group)
        s2, _ = all_to_all(f_s, plan.send2, plan.recv2, topo.node_group)
        return dequantize_1x128(q2.view(torch.float8_e4m3fn), s2, dtype=s1.dtype)

    @staticmethod
    def backward(ctx, g):
        plan, topo = ctx.plan, ctx.topo
        g2, _ = all_to_all(g.contiguous(), plan.recv2, plan.send2, topo.node_group)
        g1 = g2.new_zeros(sum(plan.recv1), g2.shape[1]).index_add(0, plan.fwd_index, g2)
        g0, _ = all_to_all(g1, plan.recv1, plan.send1, topo.rail_group)
        return g0, None, None


def fp8_two_stage_dispatch(s1, plan, topo):
    """s1 [C1, h] stage-1 copies -> [R2, h] copies received on the experts' ranks."""
    return _Fp8TwoStageDispatch.apply(s1, plan, topo)
