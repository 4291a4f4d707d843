"""The portable core attention: MLA's narrower v through the fused CPU kernel, and Megatron's
causal mask recognised as causal attention, against the masked math formula in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.attention.core import SDPAttention
from megatron_dsv3.configs import get_config


def _reference(q, k, v, scale, allowed):
    """softmax(q k^T * scale) v with `allowed` [b, 1, s, s], float64; q/k/v [s, b, h, d]."""
    qq, kk, vv = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    scores = (qq @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ vv
    s, b = q.shape[:2]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _assert_matches(out, ref, inputs):
    """out equals the float64 reference, and so do the gradients of `inputs` through both."""
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, inputs, g.double())
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-5, atol=1e-5)


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    s, b, h, dqk, dv = 12, 2, 3, 24, 16  # MLA: v narrower than q/k
    return (torch.randn(s, b, h, dqk, requires_grad=True),
            torch.randn(s, b, h, dqk, requires_grad=True),
            torch.randn(s, b, h, dv, requires_grad=True))


def test_causal_attention_with_narrower_v_reaches_the_fused_kernel_and_matches(qkv, monkeypatch):
    q, k, v = qkv
    s, b = q.shape[:2]
    attn = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=1 / math.sqrt(24))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, **kw):
        seen.append((value.shape[-1], kw.get("is_causal"), kw.get("attn_mask") is not None))
        return sdpa(query, key, value, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    causal_mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]  # Megatron's: True = masked
    for mask in (None, causal_mask, causal_mask.expand(b, 1, s, s)):
        out = attn(q, k, v, mask)
        ref = _reference(q, k, v, attn.softmax_scale, ~causal_mask)
        _assert_matches(out, ref, (q, k, v))
    # v padded to the q/k head dim, causal, no explicit mask: what the fused kernel accepts
    assert seen == [(24, True, False)] * 3


def test_other_masks_are_applied_as_given(qkv):
    """Two documents in one sequence (Megatron's reset_attention_mask): not the causal mask, so
    it must reach the kernel and keep the documents apart - also when the causal mask tensor the
    layer saw before is overwritten in place with it (no stale "is causal" answer)."""
    q, k, v = qkv
    s = q.shape[0]
    attn = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=0.2)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    allowed[s // 2:, : s // 2] = False  # the second document does not see the first
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None].clone()
    attn(q, k, v, mask)  # causal: recognised
    mask.copy_(~allowed)  # the same tensor, now two documents
    out = attn(q, k, v, mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.2, allowed[None, None]),
                               rtol=1e-5, atol=1e-5)
    fresh = attn(q, k, v, (~allowed)[None, None].clone())
    torch.testing.assert_close(fresh, out)


def test_masks_made_in_inference_mode_are_checked_every_call(qkv):
    """Inference-mode tensors track no in-place version: no cached answer for them."""
    q, k, v = qkv
    s = q.shape[0]
    attn = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=0.2)
    with torch.inference_mode():
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None].clone()
        first = attn(q.detach(), k.detach(), v.detach(), mask)
        mask[..., s // 2:, : s // 2] = True  # two documents, changed in place
        second = attn(q.detach(), k.detach(), v.detach(), mask)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    q, k, v = q.detach(), k.detach(), v.detach()
    torch.testing.assert_close(first.double(), _reference(q, k, v, 0.2, ~causal),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), _reference(q, k, v, 0.2, ~mask.clone()),
                               rtol=1e-5, atol=1e-5)


def test_value_padded_by_the_caller_gives_the_same_attention(qkv):
    """`value_head_dim` asks for v zero-padded to the q/k dim on the CPU flash path; v passed that
    way with `value_dim` gives the float64 formula on the unpadded v, gradients included."""
    q, k, v = qkv
    dqk, dv = q.shape[-1], v.shape[-1]
    attn = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=0.3)
    s = q.shape[0]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    assert attn.value_head_dim(dqk, dv, q.device, None, s, s) == dqk
    assert attn.value_head_dim(dqk, dv, q.device, causal, s, s) == dqk
    two_docs = causal.clone()
    two_docs[..., s // 2:, : s // 2] = True
    assert attn.value_head_dim(dqk, dv, q.device, two_docs, s, s) == dv  # math path: no padding
    padded = F.pad(v, (0, dqk - dv))
    for mask in (None, two_docs):
        out = attn(q, k, padded, mask, value_dim=dv)
        allowed = ~(causal if mask is None else two_docs)
        ref = _reference(q, k, v, 0.3, allowed)
        _assert_matches(out, ref, (q, k, v))
    with pytest.raises(ValueError, match="value_dim=30"):
        attn(q, k, padded, None, value_dim=30)


def test_a_new_mask_in_the_memory_of_a_causal_one_is_checked_again(qkv):
    """A loader that refills one buffer and hands out fresh tensors over it (here numpy through
    torch.from_numpy: same address, version 0 each time): the answer was keyed on the address, so
    the document mask in the causal mask's memory was taken for causal and the documents mixed."""
    import numpy as np

    q, k, v = qkv
    s = q.shape[0]
    attn = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=0.2)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    allowed[s // 2:, : s // 2] = False
    buffer = np.triu(np.ones((1, 1, s, s), dtype=bool), 1)  # causal, True = masked
    attn(q, k, v, torch.from_numpy(buffer))  # recognised as causal
    buffer[...] = (~allowed).numpy()  # the loader's next batch: two documents
    mask = torch.from_numpy(buffer)
    out = attn(q, k, v, mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.2, allowed[None, None]),
                               rtol=1e-5, atol=1e-5)


def _blocked(softmax_scale=0.3, block=4):
    """A core attention that runs causal attention blocked from 2 blocks of `block` rows on,
    at any head dim (the defaults: 64 rows, any head dim)."""
    attn = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=softmax_scale)
    attn.causal_block, attn.blocked_min_head_dim = block, 1
    return attn


def _spy_sdpa(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(v.shape[-1]) or sdpa(q, k, v, **kw))
    return seen


@pytest.mark.parametrize("s, dtype, heads_major", [
    (12, torch.float32, False),  # three whole query blocks
    (11, torch.float64, False),  # the last block short
    (9, torch.float32, True),    # q, k, v laid out [b, heads, s, d] as MLA writes them
])
def test_blocked_causal_attention_matches_the_formula(s, dtype, heads_major, monkeypatch):
    """Each query block scores only the keys up to its own last row; the output and the
    gradients of q, k and v (dk and dv summed over the blocks) equal the float64 formula, v in
    its own head dim, no kernel call."""
    torch.manual_seed(0)
    b, h, dqk, dv = 2, 3, 24, 16

    def make(d):
        if heads_major:
            return torch.randn(b, h, s, d, dtype=dtype).permute(2, 0, 1, 3).requires_grad_()
        return torch.randn(s, b, h, d, dtype=dtype, requires_grad=True)

    q, k, v = make(dqk), make(dqk), make(dv)
    attn = _blocked()
    seen = _spy_sdpa(monkeypatch)
    assert attn.value_head_dim(dqk, dv, q.device, None, s, s, batch_heads=b * h, dtype=dtype) == dv
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    for mask in (None, causal):
        out = attn(q, k, v, mask)
        assert out.dtype == dtype and out.shape == (s, b, h * dv)
        _assert_matches(out, _reference(q, k, v, 0.3, ~causal), (q, k, v))
    assert seen == []
    # a value padded by the caller (value_dim) runs blocked on its first dv columns
    padded = F.pad(v, (0, dqk - dv))
    _assert_matches(attn(q, k, padded, None, value_dim=dv),
                    _reference(q, k, v, 0.3, ~causal), (q, k, v))
    assert seen == []


def test_blocked_causal_attention_keeps_the_kernel_where_it_does_not_apply(qkv, monkeypatch):
    """One query block, a q/k head dim below the minimum, probabilities beyond the memory cap,
    an unknown batch x heads, a document mask, bfloat16 or dropout: the flash kernel (or the
    math path for the mask) with v padded as before, and the same formula."""
    q, k, v = qkv
    s, b, h, dqk = q.shape
    dv = v.shape[-1]
    seen = _spy_sdpa(monkeypatch)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    default = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=0.3)
    assert (default.causal_block, default.blocked_min_head_dim) == (64, 1)
    one_block, narrow, capped = _blocked(block=s), _blocked(), _blocked()
    narrow.blocked_min_head_dim = dqk + 1
    capped.blocked_max_bytes = b * h * (4 * 4 + 4 * 8 + 4 * 12) * 4 - 1  # one byte short
    for attn in (one_block, narrow, capped, default):
        assert attn.value_head_dim(dqk, dv, q.device, None, s, s, batch_heads=b * h,
                                   dtype=q.dtype) == dqk
        seen.clear()
        _assert_matches(attn(q, k, v, None), _reference(q, k, v, 0.3, ~causal), (q, k, v))
        assert seen == [dqk]  # the kernel, v padded
    blocked = _blocked()
    capped.blocked_max_bytes += 1
    assert capped.value_head_dim(dqk, dv, q.device, None, s, s, batch_heads=b * h,
                                 dtype=q.dtype) == dv
    assert blocked.value_head_dim(dqk, dv, q.device, None, s, s) == dqk  # batch x heads unknown
    assert blocked.value_head_dim(dqk, dv, q.device, None, s, s, batch_heads=b * h,
                                  dtype=torch.bfloat16) == dqk
    two_docs = causal.clone()
    two_docs[..., s // 2:, : s // 2] = True
    seen.clear()
    out = blocked(q, k, v, two_docs)
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.3, ~two_docs),
                               rtol=1e-5, atol=1e-5)
    assert seen == [dv]
    blocked.dropout = 0.1
    blocked.train()
    assert blocked.value_head_dim(dqk, dv, q.device, None, s, s, batch_heads=b * h,
                                  dtype=q.dtype) == dv  # dropout: math path, no padding
    blocked.eval()
    assert blocked.value_head_dim(dqk, dv, q.device, None, s, s, batch_heads=b * h,
                                  dtype=q.dtype) == dv  # no dropout in eval: blocked


def test_blocked_causal_attention_at_its_real_sizes_from_two_blocks_on(monkeypatch):
    """The default block of 64 rows at head dim 64: s = 64 keeps the kernel, s = 65 (a second
    block of one row) runs blocked, and so does s = 256 with probabilities large enough for the
    pooled memory (5 MiB), there on a second call too, whose storage held the first call's
    values; the float64 formula each time. Without gradients nothing is pooled."""
    from megatron_dsv3 import workspace

    b, h, dqk, dv = 1, 32, 64, 32
    attn = SDPAttention(get_config("deepseek-v3-tiny"), softmax_scale=0.125)
    seen = _spy_sdpa(monkeypatch)
    for s, kernel in ((64, True), (65, False), (256, False), (256, False)):
        torch.manual_seed(s)
        q, k = (torch.randn(s, b, h, dqk, requires_grad=True) for _ in range(2))
        v = torch.randn(s, b, h, dv, requires_grad=True)
        seen.clear()
        reused = workspace.POOL.reused
        out = attn(q, k, v, None)
        assert seen == ([dqk] if kernel else [])
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
        _assert_matches(out, _reference(q, k, v, 0.125, ~causal), (q, k, v))
    assert workspace.POOL.reused > reused  # the last call's buffers came from the pool
    pooled = workspace.POOL.pooled_bytes
    with torch.no_grad():  # nothing kept for a backward: nothing pooled for this new length
        attn(q[:200], k[:200], v[:200], None)
    assert workspace.POOL.pooled_bytes == pooled


def test_blocked_causal_attention_refuses_a_second_derivative():
    """create_graph through it raises (as the flash kernel's backward does) instead of leaving
    out the attention's second-order term."""
    attn = _blocked()
    q = torch.randn(12, 1, 2, 8, dtype=torch.float64, requires_grad=True)
    out = attn(q, q, q, None)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((out * torch.randn_like(out)).sum(), q, create_graph=True)


def test_dropout_and_broadcast_heads_do_not_run_blocked(monkeypatch):
    """Attention dropout in training is applied (the math path, two calls differ); k and v with
    one head broadcast over q's heads reach torch's kernel, whose result they give."""
    torch.manual_seed(0)
    s, b, h, d = 12, 2, 3, 8
    q, k, v = (torch.randn(s, b, h, d) for _ in range(3))
    attn = _blocked()
    attn.dropout = 0.5
    attn.train()
    calls = []
    from megatron_dsv3.attention import core

    apply = core._BlockedCausalAttention.apply
    monkeypatch.setattr(core._BlockedCausalAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    assert not torch.equal(attn(q, k, v, None), attn(q, k, v, None)) and calls == []
    attn.eval()
    attn(q, k, v, None)
    assert calls == [1]  # the same module without dropout runs blocked
    one = (k[:, :, :1], v[:, :, :1])
    out = attn(q, *one, None)
    want = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, *one)),
                                          is_causal=True, scale=0.3)
    torch.testing.assert_close(out, want.permute(2, 0, 1, 3).reshape(s, b, h * d))
    assert calls == [1]
