"""The flat all-to-all dispatcher, the baseline the node-aware one is measured against: every
(token, expert) pair travels directly to the expert's rank in one all-to-all over the whole
expert-parallel group, whichever node that rank is on (Megatron's alltoall dispatcher moves tokens
this way). Counted with the same hops and counters as the node-aware dispatcher; `fp8_payload`
sends the rows as E4M3 with power-of-2 1x128 scales, as the node-aware dispatcher does."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_dsv3.dispatch.base import TokenDispatcher, combine_dtype, sort_by_expert
from megatron_dsv3.dispatch.comm import Hop, all_to_all, start, wait
from megatron_dsv3.dispatch.fp8_payload import Fp8Payload
from megatron_dsv3.dispatch.counters import TrafficCounters
from megatron_dsv3.dispatch.topology import build_topology


class FlatAllToAllDispatcher(TokenDispatcher):
    """`num_experts` experts split evenly over the expert-parallel group `ep_group`;
    `fp8_payload` (config.dsv3_dispatch_fp8) needs `hidden_size`."""

    def __init__(self, num_experts: int, ep_group, *, hidden_size: Optional[int] = None,
                 fp8_payload: bool = False):
        if ep_group is None:
            raise ValueError("FlatAllToAllDispatcher needs an expert-parallel group (ep_group); "
                             "without expert parallelism use LocalDispatcher")
        if not isinstance(fp8_payload, bool):
            raise ValueError(f"fp8_payload={fp8_payload!r} (dsv3_dispatch_fp8) is invalid: "
                             "allowed values are True, False")
        if fp8_payload and (not isinstance(hidden_size, int) or hidden_size <= 0):
            raise ValueError(f"hidden_size={hidden_size!r} is invalid: the FP8 payload "
                             "(fp8_payload=True) needs the rows' width, a positive integer")
        super().__init__(num_experts, ep_group)
        self.codec = Fp8Payload(hidden_size) if fp8_payload else None
        topo = build_topology(ep_group)
        L = topo.ranks_per_node
        self.links = ["self" if r == topo.ep_rank else "intra" if r // L == topo.node else "inter"
                      for r in range(ep_group.size())]
        self.counters = TrafficCounters()
        self.lanes = topo.ep_group  # the EP group, once per lane (forward / backward passes)

    def _hop(self, send, recv):
        return Hop(send, recv, self.lanes, self.links, self.counters)

    def dispatch(self, x, indices, weights):
        W, k = self.ep_group.size(), indices.shape[1]
        order, _ = sort_by_expert(indices, self.num_experts)  # pairs by expert, hence by rank
        token = order // k
        expert = indices.flatten()[order]
        send = torch.bincount(expert // self.num_local_experts, minlength=W).tolist()
        counts = torch.tensor(send, device=x.device)  # NCCL groups take CUDA tensors only
        recv = self._hop([1] * W, [1] * W).exchange(counts.view(-1, 1)).view(-1).tolist()
        got = self._hop(send, recv).exchange(expert.int()[:, None])[:, 0]  # [R] expert ids
        hop = self._hop(send, recv)
        rows = wait(start(x.index_select(0, token), hop, codec=self.codec), hop, codec=self.codec)
        acc = combine_dtype(x.dtype)  # weights and sums: float32, float64 for float64 tokens
        w = all_to_all(weights.flatten()[order].to(acc)[:, None], self._hop(send, recv))[:, 0]
        local = got.long() - self.local_expert_offset
        by_expert = torch.argsort(local, stable=True)
        c = self.counters
        c.tokens += x.shape[0]
        c.inter_node_copies += sum(n for n, link in zip(send, self.links) if link == "inter")
        counts = torch.bincount(local, minlength=self.num_local_experts).tolist()
        c.add_tokens_per_expert(counts)
        state = (token, by_expert, w, self._hop(recv, send), x.shape[0], acc)
        return rows.index_select(0, by_expert), counts, state

    def combine(self, expert_output, state):
        token, by_expert, w, hop_back, T, acc = state
        y = torch.zeros_like(expert_output, dtype=acc).index_copy(
            0, by_expert, expert_output.to(acc)) * w[:, None]  # [R, h] in arrival order
        back = all_to_all(y.to(expert_output.dtype), hop_back).to(acc)
        return back.new_zeros(T, back.shape[1]).index_add(0, token, back).to(expert_output.dtype)
