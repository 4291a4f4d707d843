"""Portable core attention: torch's scaled_dot_product_attention, masks built on the input's device.

Same call convention as Megatron's/Transformer Engine's DotProductAttention: q, k, v are
[s, b, heads, dim] (k and v may differ in dim, as in MLA) and the result is [s, b, heads * dv].

On CPU torch's fused (flash) kernel needs v in the head dim of q and k; MLA's v is narrower
(128 vs 192 in DeepSeek-V3), which would send it to the unfused math path (full score matrix,
masked half included, softmax and its backward as separate passes). Causal attention without
dropout therefore pads v with zeros to the q/k head dim and drops the padded output columns:
the same result (the padded columns are 0 * probabilities), on the fused kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int = 1, softmax_scale: Optional[float] = None,
                 **_megatron_kwargs):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor] = None,
                attn_mask_type=None, packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise ValueError("packed sequences (packed_seq_params) are not supported by the "
                             "portable core attention (allowed value: None)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None:
            dv = v.shape[-1]
            pad = q.device.type == "cpu" and dropout == 0.0 and dv < q.shape[-1]
            if pad:
                v = F.pad(v, (0, q.shape[-1] - dv))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                 scale=self.softmax_scale)
            if pad:
                out = out[..., :dv]
        else:
            # Megatron's masks are True where attention is NOT allowed.
            allowed = ~attention_mask.to(device=q.device, dtype=torch.bool)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
