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

Causal attention on CPU in float32/float64 over sequences of two or more query blocks
(`SDPAttention.causal_block`, 64 rows) instead runs blocked (`_BlockedCausalAttention`): each
block of query rows scores only the keys it may see, the probabilities are kept for backward, and
v keeps its own head dim. torch's CPU flash kernel takes the whole sequence as one key block up
to 512 keys, so it computes (and in backward recomputes) every score above the diagonal and, for
MLA, multiplies zero-padded v columns. Every batched GEMM of the blocked form writes a contiguous
destination (torch's CPU batched GEMM runs a strided destination one matrix at a time). On 2
cores, forward + backward: [4, 8, 256, 48 / v 32] 6.1 ms against the kernel's 13.3, [4, 8, 512,
96 / v 64] 37 against 88 (docs/benchmarks.md). The blocked form keeps the probabilities,
b * heads * s * (s + 64) / 2 values, so it runs only while they fit in
`SDPAttention.blocked_max_bytes` (64 MiB per call); longer sequences keep the flash kernel's
memory.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule

from megatron_dsv3 import workspace


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


def _query_blocks(s: int, block: int):
    """[(start, end, offset)] of the query blocks of a causal sequence of length s: rows start..end
    score keys 0..end, and their probabilities follow those of the blocks before, `offset` values
    in (per batch and head)."""
    blocks, offset = [], 0
    for start in range(0, s, block):
        end = min(start + block, s)
        blocks.append((start, end, offset))
        offset += (end - start) * end
    return blocks


def blocked_probability_count(s: int, block: int) -> int:
    """Probabilities the blocked causal path keeps per (batch, head): each query block's rows
    times the keys up to its end."""
    start, end, offset = _query_blocks(s, block)[-1]
    return offset + (end - start) * end


class _BlockedCausalAttention(torch.autograd.Function):
    """Causal softmax(q k^T * scale) v by blocks of query rows, each against the keys up to its
    own last row: q, k [b, n, s, d], v [b, n, s, dv] -> [s, b, n * dv] (the core's output
    layout; each block's product goes to a contiguous piece first, then is copied there: torch's
    CPU batched GEMM runs a strided destination one matrix at a time).

    Forward per block: scores = scale * q_blk k^T (one GEMM into a kept buffer), -inf above the
    diagonal of the block's last square, softmax in place, out_blk = P v. Backward per block (the
    last, widest one first, so that it writes dk and dv and the others accumulate): dP = g_blk
    v^T, dS = softmax backward in place, dq_blk = dS k * scale, dk += dS^T q_blk * scale, dv +=
    P^T g_blk. The probabilities and their gradients live in `workspace` memory."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, block: int, pooled: bool = True):
        b, n, s, d = q.shape
        dv = v.shape[-1]
        bh = b * n
        q3, k3, v3 = q.reshape(bh, s, d), k.reshape(bh, s, d), v.reshape(bh, s, dv)
        count = bh * blocked_probability_count(s, block)
        # `pooled`: the caller keeps them for a backward (pooled memory is kept by size: an
        # evaluation over many lengths would leave one pooled buffer per length)
        probs = workspace.empty((count,), q.dtype, q.device) if pooled else q.new_empty(count)
        # each block's output rows go to a contiguous [bh, rows, dv] piece (block-major memory):
        # torch's CPU batched GEMM writes into a strided destination one matrix at a time
        outs = q.new_empty(bh * s * dv)
        above = {}  # rows -> the strict upper triangle of a rows x rows square
        blocks = _query_blocks(s, block)
        for start, end, offset in blocks:
            rows = end - start
            p = probs[bh * offset:bh * (offset + rows * end)].view(bh, rows, end)
            if rows not in above:
                above[rows] = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
            torch.baddbmm(p, q3[:, start:end], k3[:, :end].transpose(1, 2), beta=0.0,
                          alpha=scale, out=p)
            p[:, :, start:].masked_fill_(above[rows], float("-inf"))
            torch.ops.aten._softmax.out(p, -1, False, out=p)
            torch.bmm(p, v3[:, :end], out=outs[bh * start * dv:bh * end * dv].view(bh, rows, dv))
        out = q.new_empty(s, b, n, dv)
        for start, end, _ in blocks:
            out[start:end].copy_(outs[bh * start * dv:bh * end * dv].view(
                b, n, end - start, dv).permute(2, 0, 1, 3))
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.shape, ctx.scale, ctx.block = (b, n, s, d, dv), scale, block
        return out.view(s, b, n * dv)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph: no second derivative (as the flash kernel)
            raise RuntimeError("the blocked causal attention has no second derivative "
                               "(create_graph=True): its backward is not differentiable")
        q3, k3, v3, probs = ctx.saved_tensors
        b, n, s, d, dv = ctx.shape
        bh, scale = b * n, ctx.scale
        g3 = g.reshape(s, b, n, dv).permute(1, 2, 0, 3).reshape(bh, s, dv)
        dqs, dk, dvv = q3.new_empty(bh * s * d), q3.new_empty(bh, s, d), q3.new_empty(bh, s, dv)
        blocks = _query_blocks(s, ctx.block)
        widest = max((end - start) * end for start, end, _ in blocks)
        scratch = workspace.empty((bh * widest,), q3.dtype, q3.device)
        # the narrower blocks' dk and dv terms: made contiguous, then added (a batched GEMM into
        # the strided dk[:, :end] would run one matrix at a time)
        terms = q3.new_empty(bh * blocks[-1][0] * max(d, dv)) if len(blocks) > 1 else None
        for start, end, offset in reversed(blocks):
            rows = end - start
            p = probs[bh * offset:bh * (offset + rows * end)].view(bh, rows, end)
            g_blk, q_blk = g3[:, start:end], q3[:, start:end]
            ds = scratch[:bh * rows * end].view(bh, rows, end)
            torch.bmm(g_blk, v3[:, :end].transpose(1, 2), out=ds)
            torch.ops.aten._softmax_backward_data.out(ds, p, -1, q3.dtype, grad_input=ds)
            dq_blk = dqs[bh * start * d:bh * end * d].view(bh, rows, d)
            torch.baddbmm(dq_blk, ds, k3[:, :end], beta=0.0, alpha=scale, out=dq_blk)
            if end == s:  # the widest block writes dk and dv first
                torch.baddbmm(dk, ds.transpose(1, 2), q_blk, beta=0.0, alpha=scale, out=dk)
                torch.bmm(p.transpose(1, 2), g_blk, out=dvv)
                continue
            term = terms[:bh * end * d].view(bh, end, d)
            torch.bmm(ds.transpose(1, 2), q_blk, out=term)
            dk[:, :end].add_(term, alpha=scale)
            term = terms[:bh * end * dv].view(bh, end, dv)
            torch.bmm(p.transpose(1, 2), g_blk, out=term)
            dvv[:, :end].add_(term)
        dq = q3.new_empty(bh, s, d)
        for start, end, _ in blocks:
            dq[:, start:end].copy_(dqs[bh * start * d:bh * end * d].view(bh, end - start, d))
        return dq.view(b, n, s, d), dk.view(b, n, s, d), dvv.view(b, n, s, dv), None, None, None


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

    causal_block = 64
    """Query rows per block of the blocked causal path (64 measured fastest on 2 cores at head
    dims 16-192, sequences 256-1024: docs/benchmarks.md)."""
    blocked_max_bytes = 64 << 20
    """The most probability memory one call of the blocked causal path keeps for backward."""
    blocked_min_head_dim = 1
    """The smallest q/k head dim that runs blocked. The blocked form beat torch's CPU flash
    kernel at every head dim measured (16 to 192; `python bench/causal_attention.py`), in
    training steps too (`small`, head dim 48: 12% faster); a CPU whose flash kernel wins at
    small head dims can raise it."""

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

    @property
    def _dropout_p(self) -> float:
        """The attention dropout in effect (none outside training)."""
        return self.dropout if self.training else 0.0

    def _blocked(self, device: torch.device, dtype: Optional[torch.dtype],
                 batch_heads: Optional[int], s: int, qk_dim: int, causal: bool) -> bool:
        """Whether causal attention over s positions runs blocked (`_BlockedCausalAttention`):
        CPU, float32/float64, no dropout, at least two query blocks, a q/k head dim of at least
        `blocked_min_head_dim`, and the kept probabilities within `blocked_max_bytes` (unknown
        `batch_heads` or `dtype`: no)."""
        if not (causal and device.type == "cpu" and self._dropout_p == 0.0
                and batch_heads is not None and qk_dim >= self.blocked_min_head_dim
                and dtype in (torch.float32, torch.float64) and s > self.causal_block):
            return False
        kept = batch_heads * blocked_probability_count(s, self.causal_block) * dtype.itemsize
        return kept <= self.blocked_max_bytes

    def _pads_value(self, device: torch.device, qk_dim: int, v_dim: int, causal: bool) -> bool:
        """Whether v goes to the kernel zero-padded to the q/k head dim (CPU flash path)."""
        return device.type == "cpu" and self._dropout_p == 0.0 and v_dim < qk_dim and causal

    def value_head_dim(self, qk_dim: int, v_dim: int, device: torch.device,
                       attention_mask: Optional[torch.Tensor], sq: int, sk: int,
                       batch_heads: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None) -> int:
        """The head dim in which `forward` takes v best: `qk_dim` where it would pad v with zeros
        for the flash kernel, else `v_dim`. A caller that builds v anyway (MLA assembles it from
        the up-projection) writes it padded at once and passes `value_dim=v_dim` to `forward`.
        `batch_heads` (batch x local heads) and `dtype` let it tell the blocked causal path,
        which takes v unpadded; without them it answers as for the kernel (`forward` then runs
        blocked on the first `value_dim` columns: the same result, a padding spent)."""
        causal = self._causal(attention_mask, sq, sk)
        if sq == sk and self._blocked(device, dtype, batch_heads, sq, qk_dim, causal):
            return v_dim
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
        dropout = self._dropout_p
        if attention_mask is not None and self._causal(attention_mask, q.shape[-2], k.shape[-2]):
            attention_mask = None
        same_heads = k.shape[:2] == v.shape[:2] == q.shape[:2]  # (no broadcast k/v heads)
        if attention_mask is None and q.shape[-2] == k.shape[-2] and same_heads \
                and k.dtype == v.dtype == q.dtype and self._blocked(
                    q.device, q.dtype, q.shape[0] * q.shape[1], q.shape[-2], q.shape[-1], True):
            scale = self.softmax_scale if self.softmax_scale is not None else q.shape[-1] ** -0.5
            backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return _BlockedCausalAttention.apply(q, k, v[..., :dv], scale, self.causal_block,
                                                 backward)
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
