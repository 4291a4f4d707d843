"""The MTP training objective (DeepSeek-V3 section 2.2), without Megatron's CUDA-only loss tracker.

Depth k predicts the token k+1 positions ahead, so its labels are the main labels shifted k
further left (the last k positions have no target and are masked):
    L_k = 1/T sum_i CE(W_out h^k_i, t_{i+k+1})        T = tokens the shifted mask keeps
    L_MTP = lambda / D * sum_k L_k
The loss does not join the main loss's value: its gradient rides on the main hidden states'
backward (Megatron's MTPLossAutoScaler), so the training step's loss stays the LM loss.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

from megatron_dsv3 import compat
from megatron_dsv3.mtp.layer import roll_left


def attach_mtp_losses(hidden_states: torch.Tensor, mtp_hidden: Sequence[torch.Tensor],
                      labels: torch.Tensor, loss_mask: Optional[torch.Tensor], *,
                      logits_of: Callable[[torch.Tensor], torch.Tensor],
                      token_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      scaling_factor: float, per_token_loss: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attach depth k's loss (k = 1..D, `mtp_hidden[k-1]` = h^k [s, b, h]) to the main hidden
    states [s, b, h].

    `logits_of(h)` -> logits [s, b, V] (the shared output head); `token_loss(labels [b, s],
    logits)` -> per-token loss [b, s]; labels [b, s] are the main model's (next token);
    loss_mask [b, s] or None. Each depth's gradient is scaled by scaling_factor / D and divided by
    the number of tokens it covers (unless `per_token_loss`, Megatron's
    calculate_per_token_loss, which divides later by the main loss's tokens; from
    megatron-core 0.18 the depth's sum is then scaled by main tokens / its tokens, as Megatron's).
    -> (hidden states carrying the MTP gradients, mean loss per depth [D], detached).
    """
    depth = len(mtp_hidden)
    mtp_labels = labels
    mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    all_tokens = mask.sum()
    scale = scaling_factor / depth
    losses = []
    for h in mtp_hidden:
        mtp_labels, mask = roll_left(mtp_labels), roll_left(mask)
        num_tokens = mask.sum().clamp_min(1.0)
        loss = token_loss(mtp_labels, logits_of(h)) * mask               # [b, s]
        losses.append((loss.sum() / num_tokens).detach())
        if not per_token_loss:
            gradient_carrier = scale * loss / num_tokens
        elif compat.MTP_PER_TOKEN_LOSS_RESCALED:  # (see compat: as the installed Megatron does)
            gradient_carrier = scale * loss * (all_tokens / num_tokens)
        else:
            gradient_carrier = scale * loss
        hidden_states = MTPLossAutoScaler.apply(hidden_states, gradient_carrier)
    return hidden_states, torch.stack(losses)
