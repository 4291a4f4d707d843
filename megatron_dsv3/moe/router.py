"""The DeepSeek-V3 gate: a linear in float32 (or float64), sigmoid group-limited routing, bias and
load tracking, and Megatron's router options with Megatron's meaning:

- `moe_router_dtype`: 'fp64' computes the logits, the sigmoid scores, the selection and the aux
  losses in float64 (the combine weights are then used in float32, as our combine accumulates
  in float32); 'fp32' and None compute them in float32 (DeepSeek-V3's gate is FP32; Megatron's
  None would use the activation dtype, e.g. bf16 - we never go below float32).
- `moe_router_load_balancing_type` / `moe_aux_loss_coeff`: 'aux_loss' (micro-batch level),
  'seq_aux_loss' (per sequence, averaged), 'none', or a list of them with a list of
  coefficients; each with Megatron's formula (`load_balancing_loss`).
- `moe_z_loss_coeff`: coeff * mean over tokens of logsumexp(logits)^2 (ST-MoE).
- `moe_input_jitter_eps`: the router's input (not the experts') multiplied by noise drawn
  uniformly from [1 - eps, 1 + eps], in training.

The other router/dispatcher options of Megatron are refused at configuration time
(megatron_dsv3.upstream_flags).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron.core.transformer.module import MegatronModule

from megatron_dsv3.core.init import init_normal_, param_device
from megatron_dsv3.core.linear import init_seed_of
from megatron_dsv3.moe.routing import route, tokens_per_expert
from megatron_dsv3.upstream_flags import aux_loss_coefficients, router_dtype


def aux_loss_scores(logits: torch.Tensor, topk: int, valid: Optional[torch.Tensor] = None):
    """What Megatron's aux losses see for sigmoid routing (moe_utils
    compute_routing_scores_for_aux_loss): scores = sigmoid(logits) normalised over the experts,
    routing map = each token's top-k of these unbiased scores over all experts (no expert bias,
    no group limit, as in DeepSeek-V3's eq. 18). Padding tokens are zeroed in both.
    -> (routing_map [T, E] bool, scores [T, E])."""
    scores = torch.sigmoid(logits)
    scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    top = scores.topk(topk, dim=-1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
    if valid is not None:
        routing_map = routing_map & valid[:, None]
        scores = scores * valid[:, None].to(scores.dtype)
    return routing_map, scores


def switch_loss(scores: torch.Tensor, routing_map: torch.Tensor, num_tokens, topk: int,
                num_experts: int) -> torch.Tensor:
    """E / (topk * T^2) * sum_i (tokens routed to i) * (sum of scores of i): Megatron's
    switch_load_balancing_loss_func with coefficient 1 (columns may be several experts)."""
    counts = routing_map.sum(dim=0).to(scores.dtype)
    return (scores.sum(dim=0) * counts).sum() * num_experts / (topk * num_tokens * num_tokens)


def load_balancing_loss(kind: str, logits: torch.Tensor, *, topk: int, seq_len: int,
                        valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One of Megatron's balancing losses (coefficient 1) for sigmoid routing; logits [T, E] of
    tokens laid out [s, b] (token t*b + j is position t of sequence j), valid [T] True for
    non-padding tokens.

    'aux_loss': the micro-batch's tokens together, T = the (valid) tokens.
    'seq_aux_loss': each sequence on its own (DeepSeek-V3's eq. 17-20: T = that sequence's
    tokens), averaged over the sequences. With padding, T_j is sequence j's valid tokens and the
    mean is over the sequences that hold any. (Megatron-core divides every sequence by the mean
    valid count of the micro-batch: a sequence's term then moves with the other sequences'
    padding, by (mean / T_j)^2; without padding, or with equal padding, both are the same.)
    """
    T, E = logits.shape
    routing_map, scores = aux_loss_scores(logits, topk, valid)
    if kind == "aux_loss":
        # (a micro-batch of padding only: no routed token, so the loss is 0, not 0 / 0)
        n = T if valid is None else (routing_map.sum() / topk).clamp_min(1)
        return switch_loss(scores, routing_map, n, topk, E)
    if kind == "seq_aux_loss":
        b = T // seq_len
        if valid is None:
            # [s, b*E]: every (sequence, expert) pair is a column of one switch loss
            return switch_loss(scores.reshape(seq_len, b * E), routing_map.reshape(seq_len, b * E),
                               seq_len, topk, E) / b
        # per sequence j: E / (k T_j^2) * sum_i count_ji * sum_t p_tji
        counts = routing_map.reshape(seq_len, b, E).sum(dim=0).to(scores.dtype)  # [b, E]
        n = valid.reshape(seq_len, b).sum(dim=0).to(scores.dtype)                # [b]
        per_seq = (scores.reshape(seq_len, b, E).sum(dim=0) * counts).sum(dim=-1)
        per_seq = per_seq * E / (topk * n.clamp_min(1).square())  # (no valid token: 0)
        return per_seq.sum() / (n > 0).sum().clamp_min(1)
    raise ValueError(f"load balancing type {kind!r} is not implemented here: allowed values are "
                     "'aux_loss', 'seq_aux_loss' (and 'none' for no loss)")


def z_loss(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss with coefficient 1: mean over (valid) tokens of logsumexp(logits)^2."""
    values = torch.logsumexp(logits, dim=-1).square()
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp_min(1)


class SigmoidGroupRouter(MegatronModule):
    """weight [E, h] (kept in float32 math); buffers `expert_bias` [E] (aux-loss-free balancing,
    checkpointed) and `local_tokens_per_expert` [E] (loads since the last bias update) — the names
    Megatron-LM's finalize_model_grads looks for when it updates expert biases."""

    def __init__(self, config, key: str = "gate", **_unused):
        super().__init__(config=config)
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.num_groups = config.moe_router_num_groups or 1
        self.group_topk = config.moe_router_group_topk or self.num_groups
        scaling = config.moe_router_topk_scaling_factor  # None: no scaling (0 is refused)
        self.scaling_factor = 1.0 if scaling is None else scaling
        self.dtype = router_dtype(config)
        self.aux_loss_coeffs: Dict[str, float] = aux_loss_coefficients(config)
        self.z_loss_coeff = getattr(config, "moe_z_loss_coeff", None)
        self.jitter_eps = getattr(config, "moe_input_jitter_eps", None)
        self.per_token_loss = bool(getattr(config, "calculate_per_token_loss", False))
        device = param_device(config)
        self.weight = torch.nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32, device=device))
        setattr(self.weight, "sequence_parallel", False)
        if config.perform_initialization:
            init_normal_(self.weight, std=config.init_method_std, seed=init_seed_of(config),
                         key=f"{key}.weight")
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32,
                                                            device=device))
        else:
            self.expert_bias = None
        self.register_buffer("local_tokens_per_expert",
                             torch.zeros(self.num_experts, dtype=torch.float32, device=device),
                             persistent=False)
        self.last_aux_loss: Optional[torch.Tensor] = None
        """The latest balancing loss (coefficients applied), for logging."""
        self.last_z_loss: Optional[torch.Tensor] = None
        """The latest z-loss (coefficient applied), for logging."""

    def _apply(self, fn, recurse=True):
        """The balancing bias and the token counts stay float32 whatever the module is cast to
        (Megatron-LM's Float16Module calls .bfloat16() on the whole model: a BF16 bias could
        not take gamma-sized steps, nor BF16 counts count past 256); device moves apply."""
        kept = {name: self._buffers[name] for name in ("expert_bias", "local_tokens_per_expert")
                if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(device=after.device)
        return out

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """x * U(1 - eps, 1 + eps) elementwise in training (Megatron's apply_input_jitter)."""
        if not self.jitter_eps or not self.training:
            return x
        noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return x * noise

    def forward(self, x: torch.Tensor, seq_len: int, valid: Optional[torch.Tensor] = None):
        """x [T, h] (tokens in [s, b] order) -> (weights [T, k] float32, indices [T, k],
        loss: the balancing and z losses to add to the backward pass, or None)."""
        logits = self.jitter(x).to(self.dtype) @ self.weight.to(self.dtype).t()
        weights, indices = route(logits, self.expert_bias, topk=self.topk,
                                 num_groups=self.num_groups, group_topk=self.group_topk,
                                 scaling_factor=self.scaling_factor)
        weights = weights.to(torch.float32)
        loss = None
        if self.training and torch.is_grad_enabled():
            # (counted where autograd records, as Megatron does: a recomputed forward, e.g.
            # Megatron's full-layer checkpointing, runs without grad and is not counted twice)
            with torch.no_grad():
                self.local_tokens_per_expert += tokens_per_expert(indices, self.num_experts, valid)
            loss = self._losses(logits, seq_len, valid)
        return weights, indices, loss

    def _losses(self, logits, seq_len, valid):
        terms = []
        balance = [coeff * load_balancing_loss(kind, logits, topk=self.topk, seq_len=seq_len,
                                               valid=valid)
                   for kind, coeff in self.aux_loss_coeffs.items()
                   if coeff > 0 and kind != "none"]  # other types are refused at config time
        if balance:
            self.last_aux_loss = sum(balance).detach()
            terms += balance
        if self.z_loss_coeff is not None:
            z = self.z_loss_coeff * z_loss(logits, valid)
            self.last_z_loss = z.detach()
            terms.append(z)
        if not terms:
            return None
        loss = sum(terms).to(torch.float32)
        if self.per_token_loss:
            # Megatron divides every gradient by the number of tokens when
            # calculate_per_token_loss is set; scale by the local (valid) tokens so the losses
            # keep their per-micro-batch meaning (as Megatron's router does).
            loss = loss * (logits.shape[0] if valid is None else valid.sum())
        return loss
