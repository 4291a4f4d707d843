"""The node-aware two-stage dispatcher (DeepSeek-V3 section 3.2.2), on torch.distributed.

Dispatch, for a token on rank (node a, local index l) routed to experts on nodes {b}:
  stage 1 (inter-node, the rail of local index l): one copy per destination node b, to rank (b, l),
           carrying the token's expert ids and weights that live on node b;
  stage 2 (intra-node, node b): rank (b, l) forwards the copy once to each rank of node b holding
           one of those experts;
  final:   the receiving rank expands copies into one row per (copy, local expert), sorted by
           expert, for the grouped GEMM.
Combine runs the path backwards: weighted expert outputs are summed per copy on the expert's
rank, summed per node on (b, l), sent once across nodes, and summed per token at the source.
Every step is an index_select / index_add or a differentiable all-to-all, so the backward of
dispatch is a combine and the backward of combine a dispatch.

With node-limited routing (experts grouped by node, moe_router_group_topk groups kept) a token
crosses at most group_topk nodes; each crossing carries it once, whatever its number of experts
on that node. `forward_experts` splits the tokens into chunks and pipelines them, so the
inter-node stage of one chunk, the intra-node stage of another and the expert computation of a
third are in flight together (stage 1 and stage 2 use different process groups).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from megatron_dsv3.dispatch.comm import Pending, all_to_all, differentiable_all_to_all
from megatron_dsv3.dispatch.topology import EPTopology, build_topology
from megatron_dsv3.moe.dispatcher import TokenDispatcher


@dataclass
class TrafficCounters:
    """Bytes and tokens since the last `reset()`: what a step cost the network."""

    inter_node_bytes: int = 0
    intra_node_bytes: int = 0
    tokens: int = 0
    inter_node_copies: int = 0
    max_nodes_per_token: int = 0
    tokens_per_expert: Optional[torch.Tensor] = None  # [E_local], this rank's experts

    def reset(self):
        self.inter_node_bytes = self.intra_node_bytes = self.tokens = self.inter_node_copies = 0
        self.max_nodes_per_token = 0
        self.tokens_per_expert = None


@dataclass
class Plan:
    """Routing metadata of one chunk: who sends what where, for both stages and the rows."""

    num_tokens: int
    src_tokens: torch.Tensor  # [C1] token of each stage-1 copy (sorted by destination node)
    slot_mask1: torch.Tensor  # [C1, k] 1.0 where slot j's expert lives on the copy's node
    send1: List[int]
    recv1: List[int]
    fwd_index: torch.Tensor  # [C2] stage-1 copy received by this rank that each stage-2 copy carries
    slot_mask2: torch.Tensor  # [C2, k] 1.0 where slot j's expert lives on the copy's rank
    send2: List[int]
    recv2: List[int]
    row_copy: torch.Tensor  # [rows] stage-2 copy of each expert row (sorted by local expert)
    row_slot: torch.Tensor  # [rows] its slot j
    tokens_per_expert: List[int]
    nodes_per_token: torch.Tensor  # [T]
    timeline: List[Dict] = field(default_factory=list)


class NodeAwareDispatcher(TokenDispatcher):
    """Two-stage dispatch over Megatron's expert-parallel group (expert-tensor-parallel 1).

    Options (config fields, all optional): `dsv3_dispatch_chunks` (default 2) chunks for the
    overlap pipeline; `dsv3_dispatch_fp8` (default False) sends the dispatch payload as E4M3
    with power-of-2 1x128 scales (combine stays in the compute dtype).
    """

    def __init__(self, config, ep_group=None):
        super().__init__(config, ep_group)
        if ep_group is None:
            raise ValueError("NodeAwareDispatcher needs an expert-parallel group (ep_group)")
        self.topo: EPTopology = build_topology(ep_group)
        self.chunks = int(getattr(config, "dsv3_dispatch_chunks", 2) or 1)
        self.fp8 = bool(getattr(config, "dsv3_dispatch_fp8", False))
        N, E = self.topo.num_nodes, self.num_experts
        groups = getattr(config, "moe_router_num_groups", None) or 1
        if N > 1 and groups % N:
            allowed = [g for g in range(N, E + 1, N) if E % g == 0]
            raise ValueError(
                f"moe_router_num_groups={groups} does not group experts by node: the "
                f"expert-parallel group spans {N} nodes, so node-limited routing needs a multiple "
                f"of {N} groups; allowed values: {allowed}")
        self.max_nodes = min(getattr(config, "moe_router_group_topk", None) or groups, N) \
            if groups >= N else N
        self.counters = TrafficCounters()
        self.last_timeline: List[Dict] = []

    # -- routing metadata ----------------------------------------------------------------------
    def _ep_rank_of(self, experts: torch.Tensor) -> torch.Tensor:
        return torch.div(experts, self.num_local_experts, rounding_mode="floor")

    @torch.no_grad()
    def plan(self, indices: torch.Tensor) -> Plan:
        topo, dev = self.topo, indices.device
        T, k = indices.shape
        L, N = topo.ranks_per_node, topo.num_nodes
        ep_rank = self._ep_rank_of(indices)  # [T, k]
        node = torch.div(ep_rank, L, rounding_mode="floor")
        # stage 1: one copy per (token, destination node), ordered by node
        on_node = torch.zeros(T, N, dtype=torch.bool, device=dev)
        on_node.scatter_(1, node, True)
        nodes_per_token = on_node.sum(1)
        dest_node, src_tokens = on_node.t().nonzero(as_tuple=True)  # sorted by node, then token
        ids1 = torch.where(node[src_tokens] == dest_node[:, None], indices[src_tokens], -1)
        send1 = torch.bincount(dest_node, minlength=N).tolist()
        recv1 = self._exchange_counts(send1, topo.rail_group)
        recv_ids1, _ = all_to_all(ids1, send1, recv1, topo.rail_group)
        # stage 2: forward each received copy once to every rank of this node holding its experts
        local_of = torch.where(recv_ids1 >= 0,
                               self._ep_rank_of(recv_ids1.clamp_min(0)) % L, -1)  # [R1, k]
        R1 = recv_ids1.shape[0]
        on_rank = torch.zeros(R1, L + 1, dtype=torch.bool, device=dev)
        on_rank.scatter_(1, local_of + 1, True)
        on_rank = on_rank[:, 1:]
        dest_local, fwd_index = on_rank.t().nonzero(as_tuple=True)
        ids2 = torch.where(local_of[fwd_index] == dest_local[:, None], recv_ids1[fwd_index], -1)
        send2 = torch.bincount(dest_local, minlength=L).tolist()
        recv2 = self._exchange_counts(send2, topo.node_group)
        recv_ids2, _ = all_to_all(ids2, send2, recv2, topo.node_group)
        # final: one row per (copy, local expert), ordered by expert
        copy, slot = (recv_ids2 >= 0).nonzero(as_tuple=True)
        local_expert = recv_ids2[copy, slot] - self.local_expert_offset
        order = torch.argsort(local_expert, stable=True)
        counts = torch.bincount(local_expert, minlength=self.num_local_experts).tolist()
        return Plan(T, src_tokens, (ids1 >= 0).float(), send1, recv1, fwd_index,
                    (ids2 >= 0).float(), send2, recv2, copy[order], slot[order], counts,
                    nodes_per_token)

    @staticmethod
    def _exchange_counts(send: List[int], group) -> List[int]:
        t = torch.tensor(send, dtype=torch.long)
        out, _ = all_to_all(t.view(-1, 1), [1] * len(send), [1] * len(send), group)
        return out.view(-1).tolist()

    # -- the TokenDispatcher interface (one chunk, synchronous) ----------------------------------
    def dispatch(self, x, indices, weights):
        plan = self.plan(indices)
        rows, w_rows = self._dispatch(x, weights, plan, None)
        self._count(plan, x)
        return rows, plan.tokens_per_expert, (plan, w_rows)

    def combine(self, expert_output, state):
        plan, w_rows = state
        return self._combine(expert_output * w_rows[:, None].to(expert_output.dtype), plan, None)

    def forward_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        experts: Callable) -> torch.Tensor:
        """dispatch -> experts(rows, tokens_per_expert) -> weighted combine, pipelined in chunks."""
        bounds = torch.linspace(0, x.shape[0], self.chunks + 1).round().long().tolist()
        spans = [(bounds[i], bounds[i + 1]) for i in range(self.chunks)]
        plans = [self.plan(indices[a:b]) for a, b in spans]  # metadata first (small, synchronous)
        for plan in plans:
            self._count(plan, x)
        t0 = time.perf_counter()
        state: List[Dict] = [dict() for _ in spans]
        timeline: List[Dict] = []

        def mark(c, stage, start, end):
            timeline.append({"chunk": c, "stage": stage, "start": start - t0, "end": end - t0})

        # stage s of chunk c runs at tick c + s. Within a tick the newest chunk goes first: its
        # inter-node hop is issued, then the previous chunk's intra-node hop, and only then does
        # the chunk before that compute, while both transfers are in flight.
        stages = ("dispatch_inter", "dispatch_intra", "experts", "combine_intra", "combine_inter")
        for tick in range(len(spans) + len(stages) - 1):
            for c in reversed(range(len(spans))):
                a, b = spans[c]
                s = tick - c
                if not 0 <= s < len(stages):
                    continue
                st, plan = state[c], plans[c]
                if s == 0:
                    st["p1"], st["w1"] = Pending(), None
                    st["r1"], st["w1"] = self._stage1(x[a:b], weights[a:b], plan, st["p1"])
                elif s == 1:
                    r1 = self._wait(st["r1"], st["p1"])
                    mark(c, "dispatch_inter", st["p1"].issued, st["p1"].done)
                    st["p2"] = Pending()
                    st["r2"], st["w2"] = self._stage2(r1, st["w1"], plan, st["p2"])
                elif s == 2:
                    r2 = self._wait(st["r2"], st["p2"])
                    mark(c, "dispatch_intra", st["p2"].issued, st["p2"].done)
                    rows, w_rows = self._rows(r2, st["w2"], plan)
                    start = time.perf_counter()
                    out = experts(rows, plan.tokens_per_expert)
                    mark(c, "experts", start, time.perf_counter())
                    st["p3"] = Pending()
                    st["y2"] = self._combine_stage2(out * w_rows[:, None].to(out.dtype), plan,
                                                   st["p3"])
                elif s == 3:
                    y2 = self._wait(st["y2"], st["p3"])
                    mark(c, "combine_intra", st["p3"].issued, st["p3"].done)
                    st["p4"] = Pending()
                    st["y1"] = self._combine_stage1(y2, plan, st["p4"])
                elif s == 4:
                    y1 = self._wait(st["y1"], st["p4"])
                    mark(c, "combine_inter", st["p4"].issued, st["p4"].done)
                    st["out"] = self._to_tokens(y1, plan, x)
        self.last_timeline = timeline
        return torch.cat([st["out"] for st in state], dim=0)

    # -- stages ------------------------------------------------------------------------------
    def _wait(self, t, pending):
        from megatron_dsv3.dispatch.comm import AllToAllWait

        return AllToAllWait.apply(t, pending) if isinstance(t, torch.Tensor) else t

    def _stage1(self, x, weights, plan: Plan, pending: Pending):
        """Start the inter-node hop: (payload in flight, per-copy weights received)."""
        topo = self.topo
        w1 = weights[plan.src_tokens] * plan.slot_mask1  # [C1, k] (0 for experts elsewhere)
        w1 = differentiable_all_to_all(w1.float(), plan.send1, plan.recv1, topo.rail_group)
        s1 = x.index_select(0, plan.src_tokens)
        if self.fp8:
            from megatron_dsv3.dispatch.fp8_payload import fp8_two_stage_dispatch

            # the E4M3 payload travels both stages in one (synchronous) step
            pending.issued = pending.done = time.perf_counter()
            return fp8_two_stage_dispatch(s1, plan, topo), w1
        return differentiable_all_to_all(s1, plan.send1, plan.recv1, topo.rail_group, pending), w1

    def _stage2(self, r1, w1, plan: Plan, pending: Pending):
        topo = self.topo
        w2 = w1.index_select(0, plan.fwd_index) * plan.slot_mask2
        w2 = differentiable_all_to_all(w2, plan.send2, plan.recv2, topo.node_group)
        if self.fp8:
            pending.issued = pending.done = time.perf_counter()
            return r1, w2  # already at its final rank
        s2 = r1.index_select(0, plan.fwd_index)
        return differentiable_all_to_all(s2, plan.send2, plan.recv2, topo.node_group, pending), w2

    @staticmethod
    def _rows(r2, w2, plan: Plan):
        return r2.index_select(0, plan.row_copy), w2[plan.row_copy, plan.row_slot]

    def _dispatch(self, x, weights, plan: Plan, _):
        p1 = Pending()
        r1, w1 = self._stage1(x, weights, plan, p1)
        r1 = self._wait(r1, p1)
        p2 = Pending()
        r2, w2 = self._stage2(r1, w1, plan, p2)
        return self._rows(self._wait(r2, p2), w2, plan)

    def _combine_stage2(self, y_rows, plan: Plan, pending: Pending):
        """Sum each copy's expert rows on this rank, start the hop back to the forwarder."""
        y2 = y_rows.new_zeros(sum(plan.recv2), y_rows.shape[1]).index_add(0, plan.row_copy, y_rows)
        return differentiable_all_to_all(y2, plan.recv2, plan.send2, self.topo.node_group, pending)

    def _combine_stage1(self, y2_back, plan: Plan, pending: Pending):
        """Sum over the node's ranks per stage-1 copy, start the hop back across nodes."""
        y1 = y2_back.new_zeros(sum(plan.recv1), y2_back.shape[1]).index_add(0, plan.fwd_index,
                                                                           y2_back)
        return differentiable_all_to_all(y1, plan.recv1, plan.send1, self.topo.rail_group, pending)

    @staticmethod
    def _to_tokens(y1_back, plan: Plan, like):
        out = y1_back.new_zeros(plan.num_tokens, y1_back.shape[1])
        return out.index_add(0, plan.src_tokens, y1_back).to(like.dtype)

    def _combine(self, y_rows, plan: Plan, _):
        p3 = Pending()
        y2 = self._wait(self._combine_stage2(y_rows, plan, p3), p3)
        p4 = Pending()
        y1 = self._wait(self._combine_stage1(y2, plan, p4), p4)
        return self._to_tokens(y1, plan, y_rows)

    # -- traffic -------------------------------------------------------------------------------
    def _count(self, plan: Plan, x: torch.Tensor):
        topo, c, k = self.topo, self.counters, plan.slot_mask1.shape[1]
        h = x.shape[-1]
        row_bytes = (h + 4 * -(-h // 128)) if self.fp8 else h * x.element_size()
        meta = k * (8 + 4)  # expert ids (int64) and weights (fp32) per copy
        back = h * x.element_size()
        inter = sum(n for i, n in enumerate(plan.send1) if i != topo.node)
        intra = sum(n for i, n in enumerate(plan.send2) if i != topo.local)
        c.inter_node_copies += inter
        c.inter_node_bytes += inter * (row_bytes + meta) + \
            sum(n for i, n in enumerate(plan.recv1) if i != topo.node) * back
        c.intra_node_bytes += intra * (row_bytes + meta) + \
            sum(n for i, n in enumerate(plan.recv2) if i != topo.local) * back
        c.tokens += plan.num_tokens
        if plan.num_tokens:
            c.max_nodes_per_token = max(c.max_nodes_per_token, int(plan.nodes_per_token.max()))
        tpe = torch.tensor(plan.tokens_per_expert, dtype=torch.long)
        c.tokens_per_expert = tpe if c.tokens_per_expert is None else c.tokens_per_expert + tpe
