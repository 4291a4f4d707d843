"""Redundant experts: replicate the hottest experts from measured loads (DeepSeek-V3 section 3.4).

Placement, per MoE layer, from the loads of its E logical experts, for W expert-parallel ranks on
N nodes and P >= E physical expert slots (P / W per rank), in three balanced packings:

1. groups to nodes: the expert groups of group-limited routing (whole groups, G / N per node),
   heaviest group first onto the lightest node with room. A group's experts and all their
   replicas stay on one node, so node-limited routing still bounds the nodes a token reaches;
2. replicas to the heaviest: each node has P / N slots for its E / N experts; every extra slot
   goes to the expert whose load per replica is the largest (at most one replica per rank of
   the node: a second copy on the same rank would not move any work);
3. replicas to ranks: the node's replicas (each carrying load / replicas), heaviest first onto
   the lightest of the node's ranks with room (P / W slots each) not already holding that
   expert.

Applied to a model (`apply_placement`): each rank's expert stack becomes the weights of the
logical experts of its slots (gathered over the expert-parallel group), the dispatcher sees P
experts in slots of P / W, and the MoE layer maps each routed (token, logical expert) to one of
the expert's replicas, round-robin over the tokens (counted across steps). Replicas are copies, so every token's output
is unchanged; only where the work happens moves.

    recorder = ExpertLoadRecorder(model)          # counts routed tokens per layer and expert
    ... serve a workload ...
    placements = [plan_placement(l, num_groups=G, num_nodes=N, num_ranks=W, num_redundant=R)
                  for l in recorder.loads()]
    apply_placement(model, placements)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dsv3.dispatch.base import sort_by_expert
from megatron_dsv3.moe.routing import tokens_per_expert


@dataclass
class Placement:
    """One MoE layer's physical experts: slot s of rank r runs logical expert
    `slots[r][s]`; physical id = r * slots_per_rank + s."""

    slots: List[List[int]]
    num_logical: int
    num_nodes: int

    def __post_init__(self):
        # checked when made, so that apply_placement never half re-lays a model
        sizes = sorted({len(r) for r in self.slots})
        if not self.slots or sizes[0] < 1 or len(sizes) > 1:
            raise ValueError(f"Placement.slots has ranks of {sizes} slots: allowed are one or more "
                             "ranks with the same number (>= 1) of slots each")
        ids = [e for r in self.slots for e in r]
        bad = sorted({e for e in ids if not (isinstance(e, int) and 0 <= e < self.num_logical)},
                     key=repr)
        if bad:
            raise ValueError(f"Placement.slots names experts {bad[:8]}: allowed are integers in "
                             f"[0, num_logical={self.num_logical})")
        missing = sorted(set(range(self.num_logical)) - set(ids))
        if missing:
            raise ValueError(f"Placement.slots places no replica of experts {missing[:8]}: every "
                             "logical expert needs at least one slot")
        if self.num_nodes < 1 or len(self.slots) % self.num_nodes:
            raise ValueError(f"Placement.num_nodes={self.num_nodes} is invalid: allowed are "
                             f"divisors of the {len(self.slots)} ranks")

    @property
    def num_ranks(self) -> int:
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0])

    @property
    def physical_to_logical(self) -> torch.Tensor:
        return torch.tensor([e for rank in self.slots for e in rank], dtype=torch.long)

    def replicas(self) -> List[List[int]]:
        """Physical ids of each logical expert's replicas."""
        out: List[List[int]] = [[] for _ in range(self.num_logical)]
        for p, e in enumerate(self.physical_to_logical.tolist()):
            out[e].append(p)
        return out

    def rank_loads(self, loads: Sequence[float]) -> torch.Tensor:
        """[W] load of each rank if each expert's load splits evenly over its replicas."""
        loads = torch.as_tensor(loads, dtype=torch.float64)
        count = torch.bincount(self.physical_to_logical, minlength=self.num_logical).double()
        per_replica = (loads / count)[self.physical_to_logical]
        return per_replica.view(self.num_ranks, -1).sum(dim=1)


def contiguous_placement(num_experts: int, num_ranks: int, num_nodes: int = 1) -> Placement:
    """The layout without redundancy: rank r holds experts [r E/W, (r+1) E/W)."""
    n = num_experts // num_ranks
    return Placement([list(range(r * n, (r + 1) * n)) for r in range(num_ranks)], num_experts,
                     num_nodes)


def _pack(weights: Sequence[float], bins: int, capacity: int,
          labels: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Items (indices into `weights`) into `bins` bins of `capacity` items, heaviest first onto
    the lightest bin with room (ties: lower bin), avoiding bins that already hold an item of the
    same label (replicas of one expert on one rank would not share its load) while another bin
    with room does not."""
    if len(weights) != bins * capacity:
        raise ValueError(f"{len(weights)} items do not fill {bins} bins of {capacity}")
    out: List[List[int]] = [[] for _ in range(bins)]
    load = [0.0] * bins
    held: List[set] = [set() for _ in range(bins)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        label = labels[i] if labels is not None else i
        room = [b for b in range(bins) if len(out[b]) < capacity]
        room = [b for b in room if label not in held[b]] or room
        b = min(room, key=lambda b: (load[b], b))
        out[b].append(i)
        load[b] += weights[i]
        held[b].add(label)
    return out


def check_placement_args(num_experts: int, num_groups: int, num_nodes: int, num_ranks: int,
                         num_redundant: int) -> None:
    if num_nodes < 1 or num_ranks % num_nodes:
        raise ValueError(f"num_ranks={num_ranks} is not a multiple of num_nodes={num_nodes}: "
                         "allowed are equal ranks per node")
    if num_groups < 1 or num_experts % num_groups or num_groups % num_nodes:
        raise ValueError(f"num_groups={num_groups} is invalid: allowed are divisors of "
                         f"num_experts={num_experts} that are multiples of num_nodes={num_nodes}")
    physical = num_experts + num_redundant
    if num_redundant < 0 or physical % num_ranks:
        raise ValueError(f"num_redundant={num_redundant} is invalid: allowed are values >= 0 with "
                         f"num_experts + num_redundant a multiple of num_ranks={num_ranks}")
    if physical // num_nodes < num_experts // num_nodes or (physical // num_ranks) < 1:
        raise ValueError(f"num_redundant={num_redundant} leaves fewer slots than experts")


def plan_placement(loads: Sequence[float], *, num_groups: int, num_nodes: int, num_ranks: int,
                   num_redundant: int) -> Placement:
    """The hierarchical placement of one layer (module docstring) from its expert loads [E]."""
    loads = torch.as_tensor(loads, dtype=torch.float64)
    if loads.dim() != 1:
        raise ValueError(f"loads of shape {list(loads.shape)} are invalid: allowed is one load "
                         "per expert of this layer, shape [num_experts]")
    loads = loads.tolist()
    bad = [x for x in loads if not (math.isfinite(x) and x >= 0)]
    if bad or not loads:
        raise ValueError(f"loads {bad[:4]} are invalid: allowed are one finite load >= 0 per "
                         "expert (token counts)")
    E = len(loads)
    check_placement_args(E, num_groups, num_nodes, num_ranks, num_redundant)
    per_group, P = E // num_groups, E + num_redundant
    ranks_per_node, slots_per_node = num_ranks // num_nodes, P // num_nodes
    group_load = [sum(loads[g * per_group:(g + 1) * per_group]) for g in range(num_groups)]
    slots: List[List[int]] = []
    for groups in _pack(group_load, num_nodes, num_groups // num_nodes):
        experts = [g * per_group + j for g in sorted(groups) for j in range(per_group)]
        replicas = [1] * len(experts)
        for _ in range(slots_per_node - len(experts)):
            # at most one replica per rank of the node while any expert has fewer
            room = [i for i in range(len(experts)) if replicas[i] < ranks_per_node]
            i = max(room or range(len(experts)),
                    key=lambda i: (loads[experts[i]] / replicas[i], -i))
            replicas[i] += 1
        physical = [e for e, n in zip(experts, replicas) for _ in range(n)]
        share = [loads[e] / n for e, n in zip(experts, replicas) for _ in range(n)]
        # replicas of one expert on different ranks where that helps; forcing them apart can put
        # a replica on the heaviest rank, so the packing that lets them share a rank is kept when
        # its busiest rank carries less. (Both are greedy, heaviest first: near the best, and in
        # a few cases of a random search a little above the plan without redundancy, 113 vs 110.)
        packings = [_pack(share, ranks_per_node, P // num_ranks, labels=physical),
                    _pack(share, ranks_per_node, P // num_ranks)]
        best = min(packings, key=lambda packing: max(sum(share[i] for i in m) for m in packing))
        for members in best:
            slots.append(sorted(physical[i] for i in members))
    return Placement(slots, E, num_nodes)


class ReplicaMap(torch.nn.Module):
    """(token, logical expert) -> one of the expert's replicas (physical id), round-robin: the
    k-th token routed to an expert with n replicas, counted over all calls so far (so that
    small decode batches, a token or two per expert, still spread over the replicas), takes
    replica k mod n. (With two decode micro-batches in two threads the shared count may
    interleave; any replica gives the same result, only the balance is approximate.)"""

    def __init__(self, placement: Placement, rank: Optional[int] = None):
        super().__init__()
        replicas = placement.replicas()
        width = max(len(r) for r in replicas)
        table = torch.tensor([r + [r[0]] * (width - len(r)) for r in replicas], dtype=torch.long)
        self.register_buffer("table", table, persistent=False)  # [E, max replicas]
        self.register_buffer("count", torch.tensor([len(r) for r in replicas]), persistent=False)
        # tokens routed to each expert so far, started at the rank's place: ranks stepping in
        # lockstep (decoding) send a hot expert's tokens to different replicas in the same step
        start = rank if rank is not None else 0
        self.register_buffer("seen", torch.full((len(replicas),), start, dtype=torch.long),
                             persistent=False)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.flatten().long()
        order, counts = sort_by_expert(flat, self.seen.numel())
        starts = counts.cumsum(0) - counts                  # first sorted position of each expert
        kth = torch.empty_like(flat)
        kth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        choice = (self.seen[flat] + kth) % self.count[flat]  # kth: rank among its expert's tokens
        self.seen += counts
        return self.table[flat, choice].view_as(indices).to(indices.dtype)


def moe_layers(model) -> List[torch.nn.Module]:
    """The model's DeepSeekMoE modules in forward order (decoder layers, then MTP)."""
    from megatron_dsv3.moe.layer import DeepSeekMoE

    return [m for m in model.modules() if isinstance(m, DeepSeekMoE)]


class ExpertLoadRecorder:
    """Counts the tokens the routers send to each logical expert, per MoE layer, while active."""

    def __init__(self, model):
        self.layers = moe_layers(model)
        self.counts = [torch.zeros(m.router.num_experts, dtype=torch.long) for m in self.layers]
        self.handles = [m.router.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(self.layers)]

    def _hook(self, i):
        def hook(_module, _args, kwargs, output):
            # (the router's `valid`: padding positions are routed but are no load)
            valid = kwargs.get("valid")
            valid = None if valid is None else valid.cpu()
            self.counts[i] += tokens_per_expert(output[1].cpu(), self.counts[i].numel(),
                                                valid).long()
        return hook

    def loads(self, group=None) -> torch.Tensor:
        """[layers, E] counts, summed over `group` (e.g. the expert-parallel group) if given."""
        out = torch.stack(self.counts)
        if group is not None and dist.get_world_size(group) > 1:
            # on the model's device: an NCCL group reduces CUDA tensors only
            device = self.layers[0].router.weight.device if self.layers else out.device
            out = out.to(device)
            dist.all_reduce(out, group=group)
            out = out.cpu()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def apply_placement(model, placements: Sequence[Placement]) -> None:
    """Re-lay every MoE layer's routed experts by its placement (one per layer, in
    `moe_layers` order), on the running model. Collective over the expert-parallel group.
    For serving: the replicated experts are frozen and the model refuses to write a
    distributed checkpoint afterwards (save before placing)."""
    layers = moe_layers(model)
    if len(placements) != len(layers):
        raise ValueError(f"{len(placements)} placements for {len(layers)} MoE layers: allowed is "
                         "one per MoE layer")
    # every layer's placement is checked before any layer is re-laid (never half a model)
    for i, (moe, placement) in enumerate(zip(layers, placements)):
        group = moe.dispatcher.ep_group
        ep = group.size() if group is not None else 1
        if placement.num_logical != moe.router.num_experts:
            raise ValueError(f"MoE layer {i}: placement for {placement.num_logical} experts; the "
                             f"layer has {moe.router.num_experts}")
        if ep > 1 and placement.num_ranks != ep:
            raise ValueError(f"MoE layer {i}: placement over {placement.num_ranks} ranks; the "
                             f"expert-parallel group has {ep}: allowed is num_ranks={ep}")
        topo = getattr(moe.dispatcher, "topo", None)
        if topo is not None and placement.num_nodes != topo.num_nodes:
            raise ValueError(f"MoE layer {i}: placement over {placement.num_nodes} nodes; the "
                             f"dispatcher's topology has {topo.num_nodes}")
    for moe, placement in zip(layers, placements):
        d, experts = moe.dispatcher, moe.experts
        group = d.ep_group
        ep = group.size() if group is not None else 1
        rank = group.rank() if group is not None else 0
        full = [_all_experts(p, group) for p in (experts.fc1_weight, experts.fc2_weight)]
        if moe.placement is not None:  # placed before: one replica of each logical expert
            first = [r[0] for r in moe.placement.replicas()]
            full = [f[first] for f in full]
        S = placement.slots_per_rank
        mine = (torch.tensor([e for r in placement.slots for e in r]) if ep == 1
                else torch.tensor(placement.slots[rank]))
        with torch.no_grad():
            experts.fc1_weight = torch.nn.Parameter(full[0][mine].clone(), requires_grad=False)
            experts.fc2_weight = torch.nn.Parameter(full[1][mine].clone(), requires_grad=False)
        n_local = S if ep > 1 else S * placement.num_ranks
        experts.placed = True
        experts.num_local_experts = n_local
        experts.local_expert_offset = rank * n_local
        d.set_expert_layout(S * placement.num_ranks, n_local, rank * n_local)
        moe.replicas = ReplicaMap(placement, rank).to(experts.fc1_weight.device)
        moe.placement = placement


def _all_experts(local: torch.Tensor, group) -> torch.Tensor:
    """The layer's [E, ...] expert stack from every rank's local stack (logical order)."""
    if group is None or group.size() == 1:
        return local.detach()
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts)
