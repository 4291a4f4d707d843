"""The flat all-to-all dispatcher, the baseline the node-aware one is measured against: every
(token, expert) pair travels directly to the expert's rank in one all-to-all over the whole
expert-parallel group, whichever node that rank is on."""

from __future__ import annotations

import torch

from megatron_dsv3.dispatch.comm import all_to_all, differentiable_all_to_all
from megatron_dsv3.dispatch.node_aware import TrafficCounters
from megatron_dsv3.dispatch.topology import build_topology
from megatron_dsv3.moe.dispatcher import TokenDispatcher, sort_by_expert


class FlatAllToAllDispatcher(TokenDispatcher):
    def __init__(self, config, ep_group=None):
        super().__init__(config, ep_group)
        self.topo = build_topology(ep_group)
        self.counters = TrafficCounters()

    def dispatch(self, x, indices, weights):
        W, k = self.ep_group.size(), indices.shape[1]
        order, _ = sort_by_expert(indices, self.num_experts)
        token = order // k
        dest = indices.flatten()[order] // self.num_local_experts
        send = torch.bincount(dest, minlength=W).tolist()
        recv_t, _ = all_to_all(torch.tensor(send).view(-1, 1), [1] * W, [1] * W, self.ep_group)
        recv = recv_t.view(-1).tolist()
        rows = differentiable_all_to_all(x.index_select(0, token), send, recv, self.ep_group)
        w = differentiable_all_to_all(weights.flatten()[order].float()[:, None], send, recv,
                                      self.ep_group)[:, 0]
        experts, _ = all_to_all(indices.flatten()[order][:, None], send, recv, self.ep_group)
        local = experts[:, 0] - self.local_expert_offset
        by_expert = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.num_local_experts).tolist()
        self._count(send, recv, x, k)
        state = (token, send, recv, by_expert, w, x.shape[0])
        return rows.index_select(0, by_expert), counts, state

    def combine(self, expert_output, state):
        token, send, recv, by_expert, w, T = state
        y = torch.empty_like(expert_output).index_copy(0, by_expert, expert_output)
        y = y * w[:, None].to(y.dtype)
        back = differentiable_all_to_all(y, recv, send, self.ep_group)
        return back.new_zeros(T, back.shape[1]).index_add(0, token, back)

    def _count(self, send, recv, x, k):
        L, node = self.topo.ranks_per_node, self.topo.node
        row = x.shape[1] * x.element_size() + 12  # payload + expert id and weight
        inter = sum(n for r, n in enumerate(send) if r // L != node)
        c = self.counters
        c.inter_node_copies += inter
        c.inter_node_bytes += inter * row + sum(n for r, n in enumerate(recv) if r // L != node) * (
            x.shape[1] * x.element_size())
        c.intra_node_bytes += sum(n for r, n in enumerate(send) if r // L == node and r != self.topo.ep_rank) * row
        c.tokens += x.shape[0]
