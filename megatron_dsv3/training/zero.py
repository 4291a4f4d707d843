"""ZeRO-1 data parallelism on any torch.distributed backend: averaged gradients, sharded optimizer.

Parameters fall into reduction domains: dense parameters are replicated over the data-parallel
group, expert parameters (attribute `allreduce == False`) over the expert-data-parallel group.
For each domain, every step:
    1. gradients are flattened into one float32 buffer and summed over the domain's group
       (divided by its size: data-parallel ranks see different micro-batches of the global batch),
    2. rank i of the group owns the i-th contiguous 1/G slice of that buffer: it keeps float32
       master weights and the inner optimizer's state (e.g. AdamW moments) for that slice only,
       and steps them,
    3. the updated slices are all-gathered and copied back into the model's parameters.
The result equals the inner optimizer run on one rank over the whole global batch (up to the
order of floating-point additions in the reduction).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


FP32_GRAD = "grad_fp32"  # a low-precision parameter's gradient, accumulated in float32


def _accumulate_in_fp32(p: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a BF16/FP16 parameter: each gradient autograd (or a deferred
    weight gradient, megatron_dsv3.core.gemm.accumulate_grad) hands it is added into a float32
    buffer at once, so micro-batches accumulate in float32 (DeepSeek-V3 keeps the gradients of
    batch accumulation in FP32, as Megatron's main_grad does), not in the parameter's dtype."""
    if p.grad is None:
        return
    acc = getattr(p, FP32_GRAD, None)
    if acc is None:
        setattr(p, FP32_GRAD, p.grad.float())
    else:
        acc.add_(p.grad)
    p.grad = None


class _Domain:
    """Parameters sharing one reduction group, flattened into one float32 master buffer."""

    def __init__(self, name: str, params: List[torch.nn.Parameter], group, decay_mask: List[bool],
                 shard: bool = True):
        self.name, self.params, self.group = name, params, group
        self.numels = [p.numel() for p in params]
        total = sum(self.numels)
        # Without sharding every rank keeps the whole domain (plain data parallelism).
        self.shard_group = group if shard else None
        world = _size(self.shard_group)
        self.shard = -(-total // world)  # ceil
        self.padded = self.shard * world
        flat = torch.zeros(self.padded, dtype=torch.float32)
        offset = 0
        for p, n in zip(params, self.numels):
            flat[offset:offset + n] = p.detach().reshape(-1).float().cpu()
            offset += n
        start = _rank(self.shard_group) * self.shard
        self.master = torch.nn.Parameter(flat[start:start + self.shard].clone().to(params[0].device))
        # per-element weight-decay mask of this rank's slice (norm weights etc. are not decayed)
        mask = torch.zeros(self.padded, dtype=torch.bool)
        offset = 0
        for decay, n in zip(decay_mask, self.numels):
            mask[offset:offset + n] = decay
            offset += n
        self.decay = mask[start:start + self.shard].to(params[0].device)

    def flat_grad(self) -> torch.Tensor:
        device = self.params[0].device
        out = torch.zeros(self.padded, dtype=torch.float32, device=device)
        offset = 0
        for p, n in zip(self.params, self.numels):
            part = out[offset:offset + n]
            for g in (getattr(p, FP32_GRAD, None), p.grad):
                if g is not None:
                    part.add_(g.reshape(-1))
            offset += n
        return out

    def write_back(self, full: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p, n in zip(self.params, self.numels):
                p.copy_(full[offset:offset + n].view_as(p).to(p.dtype))
                offset += n


class ZeroOneOptimizer:
    """ZeRO-1 around an inner optimizer class (torch AdamW, or our AdamW with BF16 moments).

    `dp_group` reduces dense parameters, `expert_dp_group` expert parameters (None = no peers).
    Both domains' reduced gradients are divided by the data-parallel size (`dp_group`'s), as
    Megatron scales them: an expert's local gradient already sums the tokens of every rank of its
    expert-parallel group, so the expert-data-parallel group (dp / ep ranks) completes the sum
    over all dp ranks' losses, and dividing by its own size would leave it ep times too large.
    Weight decay applies to matrices only (ndim > 1), as in Megatron. With `shard=False` the
    same object is plain data parallelism: averaged gradients, full optimizer state everywhere.
    """

    def __init__(self, params, optimizer_cls: Callable, dp_group=None, expert_dp_group=None,
                 weight_decay: float = 0.0, shard: bool = True, **optimizer_kwargs):
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.dtype in (torch.bfloat16, torch.float16) and not getattr(p, "_fp32_hooked", False):
                p.register_post_accumulate_grad_hook(_accumulate_in_fp32)
                p._fp32_hooked = True  # (once, whichever optimizer sees the parameter first)
        dense = [p for p in params if getattr(p, "allreduce", True)]
        experts = [p for p in params if not getattr(p, "allreduce", True)]
        self.domains: List[_Domain] = []
        for name, group_params, group in (("dense", dense, dp_group),
                                           ("expert", experts, expert_dp_group)):
            if group_params:
                self.domains.append(_Domain(name, group_params, group,
                                            [p.ndim > 1 for p in group_params], shard))
        self.weight_decay = weight_decay
        self.grad_divisor = _size(dp_group)  # every domain: the mean over data-parallel losses
        # Decay is applied by masking: the inner optimizer runs without it on the shard.
        self.inner = optimizer_cls([d.master for d in self.domains], weight_decay=0.0,
                                   **optimizer_kwargs)

    @property
    def param_groups(self):
        # Always the inner optimizer's live list (load_state_dict replaces it).
        return self.inner.param_groups

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average gradients over each domain's group and hand this rank's slice to its master."""
        for d in self.domains:
            flat = d.flat_grad()
            if _size(d.group) > 1:
                dist.all_reduce(flat, group=d.group)
            if self.grad_divisor > 1:
                flat /= self.grad_divisor
            start = _rank(d.shard_group) * d.shard
            d.master.grad = flat[start:start + d.shard].clone()

    def grad_norm_sq(self) -> torch.Tensor:
        """This rank's share of the squared gradient norm: every gradient entry is counted by
        exactly one rank of its domain's group (call after reduce_gradients; the caller sums
        the shares over all ranks)."""
        total = torch.zeros((), dtype=torch.float32)
        for d in self.domains:
            if d.shard_group is not None or _rank(d.group) == 0:
                total += d.master.grad.float().pow(2).sum().cpu()
        return total

    def scale_gradients(self, factor: float) -> None:
        for d in self.domains:
            d.master.grad.mul_(factor)

    @torch.no_grad()
    def step(self) -> None:
        for d in self.domains:
            lr = self.inner.param_groups[0]["lr"]
            if self.weight_decay:
                d.master.mul_(torch.where(d.decay, 1.0 - lr * self.weight_decay, 1.0))
        self.inner.step()
        for d in self.domains:
            world = _size(d.shard_group)
            if world > 1:
                parts = [torch.empty_like(d.master) for _ in range(world)]
                dist.all_gather(parts, d.master.detach().contiguous(), group=d.shard_group)
                full = torch.cat(parts)
            else:
                full = d.master.detach()
            d.write_back(full)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for d in self.domains:
            d.master.grad = None
            for p in d.params:
                p.grad = None
                if getattr(p, FP32_GRAD, None) is not None:
                    setattr(p, FP32_GRAD, None)

    def state_dict(self) -> Dict:
        """This rank's shard: master slices and inner optimizer state (layout-specific)."""
        return {"inner": self.inner.state_dict(),
                "masters": [d.master.detach().clone() for d in self.domains],
                "layout": self._layout()}

    def _layout(self):
        return [(d.name, d.padded, _size(d.shard_group), _rank(d.shard_group)) for d in self.domains]

    def load_state_dict(self, state: Dict) -> None:
        layout = self._layout()
        if [tuple(x) for x in state["layout"]] != layout:
            raise ValueError(f"optimizer shard layout {state['layout']} does not match this run's "
                             f"{layout}: resume with the same parallel layout")
        with torch.no_grad():
            for d, m in zip(self.domains, state["masters"]):
                d.master.copy_(m)
        self.inner.load_state_dict(state["inner"])
