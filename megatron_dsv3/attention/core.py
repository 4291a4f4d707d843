"""Portable core attention: torch's scaled_dot_product_attention, masks built on the input's device.

Same call convention as Megatron's/Transformer Engine's DotProductAttention: q, k, v are
[s, b, heads, dim] (k and v may differ in dim, as in MLA) and the result is [s, b, heads * dv].

On CPU torch's fused (flash) kernel needs v in the head dim of q and k; MLA's v is narrower
(128 vs 192 in DeepSeek-V3), which would send it to the unfused math path (full score matrix,
masked half included, softmax and its backward as separate passes). Causal attention without
dropout therefore pads v with zeros to the q/k head dim and drops the padded output columns:
the same result (the padded columns are 0 * probabilities), on the fused kernel. A mask that is
exactly the causal mask (what Megatron-LM's data loader builds by default) is recognised and run
as causal attention; any other mask (document boundaries, padding) is applied as given.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule


class _ToSequenceMajor(torch.autograd.Function):
    """[b, heads, s, d] -> [s, b, heads * dv], keeping the first dv of d (the unpadded v
    columns). Backward writes the gradient into a fresh [b, heads, s, d] once and zeroes only
    the dropped columns (autograd's slice backward zero-fills all of it, then copies)."""

    @staticmethod
    def forward(ctx, out, dv: int):
        b, n, s, d = out.shape
        ctx.n, ctx.d, ctx.dv = n, d, dv
        return out[..., :dv].permute(2, 0, 1, 3).reshape(s, b, n * dv)

    @staticmethod
    def backward(ctx, g):
        s, b, _ = g.shape
        grad = g.new_empty(b, ctx.n, s, ctx.d)
        grad[..., :ctx.dv].copy_(g.view(s, b, ctx.n, ctx.dv).permute(1, 2, 0, 3))
        grad[..., ctx.dv:].zero_()
        return grad, None


class SDPAttention(MegatronModule):
    heads_major_inputs = True
    """q, k, v whose memory is laid out [b, heads, s, d] (viewed as [s, b, heads, d]) reach the
    kernels without copies; on CPU the flash backward zero-fills and accumulates its gradients
    in the inputs' layout, which costs 2.2 ms more per call at [4, 8, 256, 48] when that layout
    is [s, b, heads, d] (MLA assembles q, k, v this way when its core says so)."""

    def __init__(self, config, layer_number: int = 1, softmax_scale: Optional[float] = None,
                 **_megatron_kwargs):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout
        self._causal_seen = None  # (weak reference to the mask, its version, answer)

    def _is_causal(self, mask: torch.Tensor, sq: int, sk: int) -> bool:
        """True if Megatron's mask [b or 1, 1, sq, sk] (True = not allowed) is the causal mask for
        every sequence. The answer is kept for the mask object itself (the same tensor reaches
        every layer of a step) and its in-place version, through a weak reference: a new mask,
        even one in the memory of a freed causal mask, is checked again (keyed on the address, a
        document mask there was taken for causal). Inference-mode tensors have no version: they
        are checked on every call."""
        seen = self._causal_seen
        if seen is not None and not mask.is_inference() and seen[0]() is mask \
                and seen[1] == mask._version:
            return seen[2]
        answer = False
        if mask.dim() == 4 and mask.shape[1] == 1 and tuple(mask.shape[-2:]) == (sq, sk) \
                and sq == sk:
            causal = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu_(1)
            answer = bool((mask.to(torch.bool) == causal).all())
        self._causal_seen = (None if mask.is_inference() else
                             (weakref.ref(mask), mask._version, answer))
        return answer

    def _causal(self, mask: Optional[torch.Tensor], sq: int, sk: int) -> bool:
        return mask is None or self._is_causal(mask, sq, sk)

    def _pads_value(self, device: torch.device, qk_dim: int, v_dim: int, causal: bool) -> bool:
        """Whether v goes to the kernel zero-padded to the q/k head dim (CPU flash path)."""
        dropout = self.dropout if self.training else 0.0
        return device.type == "cpu" and dropout == 0.0 and v_dim < qk_dim and causal

    def value_head_dim(self, qk_dim: int, v_dim: int, device: torch.device,
                       attention_mask: Optional[torch.Tensor], sq: int, sk: int) -> int:
        """The head dim in which `forward` takes v: `qk_dim` where it would pad v with zeros for
        the flash kernel, else `v_dim`. A caller that builds v anyway (MLA assembles it from the
        up-projection) writes it padded at once and passes `value_dim=v_dim` to `forward`."""
        causal = self._causal(attention_mask, sq, sk)
        return qk_dim if self._pads_value(device, qk_dim, v_dim, causal) else v_dim

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor] = None,
                attn_mask_type=None, packed_seq_params=None, value_dim: Optional[int] = None,
                **_unused):
        """`value_dim`: v's own head dim when `value` arrives zero-padded beyond it (see
        `value_head_dim`); the padded output columns are dropped."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences (packed_seq_params) are not supported by the "
                             "portable core attention (allowed value: None)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dv = v.shape[-1] if value_dim is None else value_dim
        if not 0 < dv <= v.shape[-1]:
            raise ValueError(f"value_dim={value_dim}: allowed values are 1..{v.shape[-1]} (the "
                             "head dim of the value tensor) or None")
        dropout = self.dropout if self.training else 0.0
        if attention_mask is not None and self._causal(attention_mask, q.shape[-2], k.shape[-2]):
            attention_mask = None
        if attention_mask is None:
            if v.shape[-1] < q.shape[-1] and self._pads_value(q.device, q.shape[-1], dv, True):
                v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        else:
            # Megatron's masks are True where attention is NOT allowed.
            allowed = ~attention_mask.to(device=q.device, dtype=torch.bool)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        return _ToSequenceMajor.apply(out, dv)
