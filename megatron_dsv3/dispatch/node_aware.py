"""The node-aware two-stage dispatcher (DeepSeek-V3 section 3.2.2), on torch.distributed.

Dispatch, for a token on rank (node a, local index l) routed to experts on nodes {b}:
  stage 1 (inter-node, the rail of local index l): one copy per destination node b, to rank
           (b, l), with the ids and weights of the token's experts on node b;
  stage 2 (intra-node, node b): rank (b, l) relays the copy once to each rank of node b that
           holds one of those experts;
  rows:    the expert's rank expands each copy into one row per local expert, sorted by expert,
           for the grouped GEMM.
Combine runs the path backwards and reduces on the way: expert outputs times their weights are
summed per copy on the expert's rank, per node on (b, l), sent once across nodes, and summed per
token at the source. Every step is an index_select / index_add or a differentiable all-to-all,
so the backward of dispatch is a combine and the backward of combine a dispatch.

With node-limited routing (experts grouped by node, `moe_router_group_topk` groups kept) a token
crosses at most that many nodes, once each, whatever its number of experts there; the counters
check it at runtime. `forward_experts` cuts the tokens into chunks and pipelines them: at each
tick the newest chunk's inter-node transfer and the previous chunk's intra-node transfer are
issued (asynchronously, on two different process groups) before the chunk before that computes
its experts, and the combine's two transfers follow the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from megatron_dsv3.dispatch.base import TokenDispatcher, combine_dtype
from megatron_dsv3.dispatch.comm import BackwardMark, Hop, start, wait
from megatron_dsv3.dispatch.counters import TrafficCounters
from megatron_dsv3.dispatch.fp8_payload import Fp8Payload
from megatron_dsv3.dispatch.layout import Copies, copies_by_destination
from megatron_dsv3.dispatch.topology import EPTopology, build_topology, node_limit

STAGES = ("dispatch_inter", "dispatch_intra", "experts", "combine_intra", "combine_inter")


@dataclass
class Plan:
    """Routing metadata of one chunk, exchanged before its payload moves."""

    num_tokens: int
    inter: Copies  # stage-1 copies of this rank's tokens, by destination node
    recv1: List[int]  # stage-1 copies this rank receives from each node
    intra: Copies  # stage-2 copies of the received stage-1 copies, by destination local index
    recv2: List[int]
    rows: Copies  # expert rows of the received stage-2 copies, by local expert
    nodes_per_token: torch.Tensor  # [T] nodes each token reaches (its own included)


class NodeAwareDispatcher(TokenDispatcher):
    """Two-stage dispatch of `num_experts` experts over the expert-parallel group `ep_group`.

    Routing facts (from the binding, `layer_specs.make_dispatcher`): `hidden_size` (the row width,
    config.hidden_size), `num_groups` / `group_topk` (config.moe_router_num_groups /
    moe_router_group_topk: the node limit the counters check). Options: `chunks`
    (config.dsv3_dispatch_chunks) for the overlap pipeline; `fp8_payload`
    (config.dsv3_dispatch_fp8) sends the dispatch payload as E4M3 with power-of-2 1x128 scales,
    the combine stays in the compute dtype; `expert_tensor_parallel_size` must be 1. `counters`
    holds the traffic since its last reset; `last_timeline` the per-chunk stage times of the last
    forward_experts (and of its backward, once that has run).
    """

    def __init__(self, num_experts: int, ep_group, *, hidden_size: int,
                 num_groups: Optional[int], group_topk: Optional[int], chunks: int = 2,
                 fp8_payload: bool = False, expert_tensor_parallel_size: int = 1):
        if ep_group is None:
            raise ValueError("NodeAwareDispatcher needs an expert-parallel group (ep_group); "
                             "without expert parallelism use LocalDispatcher")
        ep = ep_group.size()
        if num_experts % ep:
            raise ValueError(f"num_moe_experts={num_experts} (argument num_experts) is not "
                             f"divisible by the expert-parallel size {ep} (the ep_group's size, "
                             f"expert_model_parallel_size); allowed sizes: divisors of "
                             f"{num_experts}")
        if expert_tensor_parallel_size != 1:
            raise ValueError(f"expert_tensor_parallel_size={expert_tensor_parallel_size} is not "
                             "supported by the node-aware dispatcher: allowed value 1 "
                             "(DeepSeek-V3 trains experts without tensor parallelism)")
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks <= 0:
            raise ValueError(f"chunks={chunks!r} (dsv3_dispatch_chunks) is invalid: allowed "
                             "values are positive integers")
        if not isinstance(fp8_payload, bool):
            raise ValueError(f"fp8_payload={fp8_payload!r} (dsv3_dispatch_fp8) is invalid: "
                             "allowed values are True, False")
        if fp8_payload and (not isinstance(hidden_size, int) or isinstance(hidden_size, bool)
                            or hidden_size <= 0):
            raise ValueError(f"hidden_size={hidden_size!r} is invalid: the FP8 payload "
                             "(fp8_payload=True) needs the rows' width, a positive integer")
        super().__init__(num_experts, ep_group)
        self.chunks = chunks
        self.topo: EPTopology = build_topology(ep_group)
        self.node_limit = node_limit(self.topo.num_nodes, num_groups, group_topk)
        self.codec = Fp8Payload(hidden_size) if fp8_payload else None
        self.counters = TrafficCounters()
        self.last_timeline: List[Dict] = []
        topo = self.topo
        self.rail_links = ["self" if n == topo.node else "inter" for n in range(topo.num_nodes)]
        self.node_links = ["self" if l == topo.local else "intra"
                           for l in range(topo.ranks_per_node)]

    # -- routing metadata ----------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, indices: torch.Tensor) -> Plan:
        """indices [T, k] global expert ids -> who sends what where, for both stages and the rows.
        Exchanges the counts and expert ids (int32) of the copies; counts them as traffic."""
        topo, E_local = self.topo, self.num_local_experts
        L, N = topo.ranks_per_node, topo.num_nodes
        T = indices.shape[0]
        if indices.numel():
            # before any exchange (a bad id stops only the rank that has it): a negative id
            # had no destination and its slot, weight included, vanished from the combine
            lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # (one host sync)
            if lo < 0 or hi >= self.num_experts:
                raise ValueError(f"expert indices range over [{lo}, {hi}]: allowed are expert "
                                 f"ids 0..{self.num_experts - 1} (num_experts)")
        owner = indices.long() // E_local  # [T, k] EP rank holding each chosen expert
        inter = copies_by_destination(owner // L, N)
        ids1 = torch.where(inter.slots, indices.index_select(0, inter.source), -1).int()
        recv1, got1 = self._exchange(inter.counts, ids1, topo.rail_group, self.rail_links)
        local = torch.where(got1 >= 0, got1.long() // E_local % L, -1)  # [R1, k]
        intra = copies_by_destination(local, L)
        ids2 = torch.where(intra.slots, got1.index_select(0, intra.source), -1)
        recv2, got2 = self._exchange(intra.counts, ids2, topo.node_group, self.node_links)
        local_expert = torch.where(got2 >= 0, got2.long() - self.local_expert_offset, -1)
        # one row per (copy, local expert) here; rows.slots marks the slots naming that expert
        # (several if a routing repeats an expert: their weights add up)
        rows = copies_by_destination(local_expert, E_local)
        nodes_per_token = torch.bincount(inter.source, minlength=T)
        return Plan(T, inter, recv1, intra, recv2, rows, nodes_per_token)

    def _exchange(self, send: List[int], ids: torch.Tensor, group, links):
        members = len(send)
        # the counts travel on the payload's device: NCCL groups take CUDA tensors only
        counts = Hop([1] * members, [1] * members, group, links, self.counters).exchange(
            torch.tensor(send, dtype=torch.long, device=ids.device).view(-1, 1))
        recv = counts.view(-1).tolist()
        return recv, Hop(send, recv, group, links, self.counters).exchange(ids)

    def _count(self, plan: Plan) -> None:
        c, node = self.counters, self.topo.node
        c.tokens += plan.num_tokens
        c.inter_node_copies += sum(n for b, n in enumerate(plan.inter.counts) if b != node)
        if plan.num_tokens:
            c.max_nodes_per_token = max(c.max_nodes_per_token, int(plan.nodes_per_token.max()))
            c.tokens_over_node_limit += int((plan.nodes_per_token > self.node_limit).sum())
        c.add_tokens_per_expert(plan.rows.counts)

    # -- the TokenDispatcher interface: one chunk, each stage finished before the next -----------
    def dispatch(self, x, indices, weights):
        plan = self.plan(indices)
        self._count(plan)
        flow = _ChunkFlow(self, x, weights, plan, chunk=0, timeline=None)
        flow.start_inter()
        flow.start_intra()
        rows, row_weights = flow.arrive()
        return rows, plan.rows.counts, (flow, row_weights)

    def combine(self, expert_output, state):
        flow, row_weights = state
        flow.start_combine_intra(expert_output, row_weights)
        flow.start_combine_inter()
        return flow.finish()

    # -- pipelined -----------------------------------------------------------------------------
    def forward_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        experts: Callable) -> torch.Tensor:
        """dispatch -> experts(rows, tokens_per_expert) -> weighted combine, pipelined in chunks.

        Stage s of chunk c runs at tick c + s (STAGES). Within a tick the newest chunk goes first,
        so its transfer is in flight before an older chunk's experts start.
        """
        T = x.shape[0]
        bounds = [round(i * T / self.chunks) for i in range(self.chunks + 1)]
        spans = list(zip(bounds[:-1], bounds[1:]))
        plans = [self.plan(indices[a:b]) for a, b in spans]  # metadata first (small)
        for plan in plans:
            self._count(plan)
        timeline: List[Dict] = []
        flows = [_ChunkFlow(self, x[a:b], weights[a:b], plan, c, timeline)
                 for c, ((a, b), plan) in enumerate(zip(spans, plans))]
        outputs: List[Optional[torch.Tensor]] = [None] * len(flows)
        for tick in range(len(flows) + len(STAGES) - 1):
            for c in reversed(range(len(flows))):
                stage, flow = tick - c, flows[c]
                if stage == 0:
                    flow.start_inter()
                elif stage == 1:
                    flow.start_intra()
                elif stage == 2:
                    rows, row_weights = flow.arrive()
                    flow.start_combine_intra(flow.run_experts(experts, rows), row_weights)
                elif stage == 3:
                    flow.start_combine_inter()
                elif stage == 4:
                    outputs[c] = flow.finish()
        self.last_timeline = timeline
        return torch.cat(outputs, dim=0)


class _ChunkFlow:
    """One chunk's path to its experts and back; each method is one step of the pipeline."""

    def __init__(self, d: NodeAwareDispatcher, x, weights, plan: Plan, chunk: int,
                 timeline: Optional[list]):
        topo = d.topo
        self.x, self.weights, self.plan, self.codec = x, weights, plan, d.codec
        self.acc = combine_dtype(x.dtype)  # weights and sums: float32, float64 for float64
        self.chunk, self.timeline = chunk, timeline
        rail, node = topo.rail_group, topo.node_group

        def hop(send, recv, group, links, stage=None, relayed=False):
            label = {"chunk": chunk, "stage": stage}
            return Hop(send, recv, group, links, d.counters, timeline if stage else None, label,
                       relayed)

        p = plan
        self.hop1 = hop(p.inter.counts, p.recv1, rail, d.rail_links, "dispatch_inter",
                        relayed=d.codec is not None)
        self.hop2 = hop(p.intra.counts, p.recv2, node, d.node_links, "dispatch_intra")
        self.weight_hop1 = hop(p.inter.counts, p.recv1, rail, d.rail_links)
        self.weight_hop2 = hop(p.intra.counts, p.recv2, node, d.node_links)
        self.hop3 = hop(p.recv2, p.intra.counts, node, d.node_links, "combine_intra")
        self.hop4 = hop(p.recv1, p.inter.counts, rail, d.rail_links, "combine_inter")

    def start_inter(self):
        """Stage 1: each token once to every destination node, with its weights there."""
        p = self.plan
        w1 = self.weights.index_select(0, p.inter.source).to(self.acc) * p.inter.slots  # [C1, k]
        self.w1 = start(w1, self.weight_hop1)
        s1 = self.x.index_select(0, p.inter.source)  # [C1, h]
        self.r1 = start(s1, self.hop1, codec=self.codec)

    def start_intra(self):
        """Stage 2: relay each received copy once to each rank of this node holding its experts."""
        p = self.plan
        r1 = wait(self.r1, self.hop1)  # [R1, h]
        w1 = wait(self.w1, self.weight_hop1)  # [R1, k]
        w2 = w1.index_select(0, p.intra.source) * p.intra.slots  # [C2, k]
        self.w2 = start(w2, self.weight_hop2)
        if self.codec is not None:  # the E4M3 bytes travel on unchanged
            self.r2 = start(r1, self.hop2, relay=self.hop1, select=p.intra.source)
        else:
            self.r2 = start(r1.index_select(0, p.intra.source), self.hop2)

    def arrive(self):
        """-> rows [N, h] sorted by local expert, and each row's combine weight [N] (float32, or
        float64 for float64 tokens): the sum of the weights of the slots naming its expert."""
        p = self.plan
        r2 = wait(self.r2, self.hop2, codec=self.codec)  # [R2, h]
        w2 = wait(self.w2, self.weight_hop2)  # [R2, k]
        return r2.index_select(0, p.rows.source), (w2.index_select(0, p.rows.source)
                                                   * p.rows.slots).sum(1)

    def run_experts(self, experts: Callable, rows: torch.Tensor) -> torch.Tensor:
        forward = {"chunk": self.chunk, "stage": "experts", "pass": "forward"}
        backward = {"chunk": self.chunk, "stage": "experts", "pass": "backward"}
        if torch.is_grad_enabled():
            rows = BackwardMark.apply(rows, backward, "end")
        forward["start"] = time.perf_counter()
        out = experts(rows, self.plan.rows.counts)
        forward["end"] = time.perf_counter()
        self.timeline.append(forward)
        if out.requires_grad:
            out = BackwardMark.apply(out, backward, "start")
            self.timeline.append(backward)
        return out

    def start_combine_intra(self, expert_output: torch.Tensor, row_weights: torch.Tensor):
        """Weighted expert outputs summed per copy (float32 or wider), sent back to the relaying
        rank."""
        p = self.plan
        y = expert_output.to(self.acc) * row_weights[:, None]  # [N, h]
        y2 = y.new_zeros(sum(p.recv2), y.shape[1]).index_add(0, p.rows.source, y)
        self.y2 = start(y2.to(self.x.dtype), self.hop3)

    def start_combine_inter(self):
        """Summed over this node's ranks per stage-1 copy, sent back across nodes once."""
        p = self.plan
        y2 = wait(self.y2, self.hop3).to(self.acc)  # [C2, h]
        y1 = y2.new_zeros(sum(p.recv1), y2.shape[1]).index_add(0, p.intra.source, y2)
        self.y1 = start(y1.to(self.x.dtype), self.hop4)

    def finish(self) -> torch.Tensor:
        """-> [T, h]: each token's sum over its destination nodes."""
        p = self.plan
        y1 = wait(self.y1, self.hop4).to(self.acc)  # [C1, h]
        out = y1.new_zeros(p.num_tokens, y1.shape[1]).index_add(0, p.inter.source, y1)
        return out.to(self.x.dtype)
