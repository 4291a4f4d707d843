"""Serving across ranks the DeepSeek-V3 way: attention data-parallel, experts expert-parallel.

Every rank holds the attention, dense and shared-expert weights whole and serves its own requests
(its own latent cache); the routed experts are split over the expert-parallel group, and each MoE
layer sends tokens to the ranks holding their experts through the model's dispatcher (the
node-aware one by default). Dispatch and combine are collectives of the expert-parallel group, so
all its ranks must run the same MoE layers in the same order, each with its own tokens, possibly
none. `Lockstep` keeps them in step:

- before each engine step the ranks agree on whether anyone still has work and on the number of
  prefills in this step (the largest of any rank);
- a rank with fewer prefills, or nothing to decode, runs idle forwards: every layer's FFN on zero
  tokens, so its MoE layers take part in the all-to-alls (sending nothing, serving other ranks'
  tokens with its experts).

A token's result does not depend on which rank serves its request or which ranks its experts
live on, so the tokens generated are those of one rank serving all requests (up to the order of
float32 sums in the combine).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


class PeerStoppedError(RuntimeError):
    """Another rank of the expert-parallel group stopped serving (an error, or its consumer
    stopped reading); its own log names the cause."""


class Lockstep:
    """Agreement among the ranks of `group` (the expert-parallel group) before each step. A rank
    that stops (an error of its own, or its stream closed early) says so in its next agreement
    (`stop`), so the others end at once with PeerStoppedError naming it instead of waiting in the
    next collective until the group times out."""

    def __init__(self, group, device=None):
        self.group = group
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.rounds = 0

    def _reduce(self, stopped: bool, busy: bool, prefills: int):
        rank = dist.get_rank(self.group)
        # (on the model's device: an NCCL group reduces CUDA tensors only)
        t = torch.tensor([rank + 1 if stopped else 0, int(busy), prefills], dtype=torch.long,
                         device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self.rounds += 1
        return int(t[0]) - 1, bool(t[1]), int(t[2])

    def agree(self, busy: bool, prefills: int) -> Tuple[bool, int]:
        """-> (any rank busy, the largest number of prefills of any rank this step).
        PeerStoppedError when another rank has stopped."""
        stopped, busy, most = self._reduce(False, busy, prefills)
        if stopped >= 0:
            raise PeerStoppedError(
                f"rank {stopped} of the expert-parallel group stopped serving (its own log or "
                "exception says why); this rank stops too, as its MoE layers can no longer "
                "exchange tokens with it")
        return busy, most

    def stop(self) -> None:
        """This rank stops: tell the others in the agreement they are about to make."""
        self._reduce(True, False, 0)


def expert_parallel_group_of(model):
    """The expert-parallel group of the model's MoE dispatchers (None without expert
    parallelism). All MoE layers must share it."""
    groups = {id(m.dispatcher.ep_group): m.dispatcher.ep_group for m in model.modules()
              if getattr(getattr(m, "dispatcher", None), "ep_group", None) is not None}
    groups = {k: g for k, g in groups.items() if g.size() > 1}
    if len(groups) > 1:
        raise ValueError("the model's MoE layers use different expert-parallel groups; serving "
                         "needs one")
    return next(iter(groups.values()), None)


def lockstep_for(model) -> Optional[Lockstep]:
    group = expert_parallel_group_of(model)
    if group is None:
        return None
    return Lockstep(group, device=next(model.parameters()).device)


def shard(requests: Sequence, rank: int, world: int) -> List[int]:
    """Indices of the requests attention-data-parallel rank `rank` of `world` serves
    (round-robin)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is invalid: allowed values are 0..{world - 1}")
    return list(range(rank, len(requests), world))
