"""MLA against a naive per-head float64 reference written from the equations."""

import math

import pytest
import torch

from megatron_dsv3.attention.mla import MLASelfAttention
from megatron_dsv3.attention.rope import yarn_inv_freq
from megatron_dsv3.configs import get_config
from megatron_dsv3.layer_specs import get_layer_spec


def build_mla(config, layer_number=1):
    spec = get_layer_spec(config).submodules.self_attention
    return MLASelfAttention(config, spec.submodules, layer_number=layer_number)


def naive_yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow):
    """YaRN from its definition, float64, written independently (wavelength form)."""
    out = []
    def corr(rot):  # the dimension index whose wavelength completes `rot` rotations in `orig`
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / ((high - low) or 0.001), 0.0), 1.0)
        out.append(theta * (1 - ramp) + theta / factor * ramp)
    return torch.tensor(out, dtype=torch.float64)


def rotate_pairs(x, pos, inv_freq, attn_factor):
    """Complex-number RoPE on interleaved pairs (DeepSeek's reference form)."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    angle = pos.double()[:, None] * inv_freq[None, :]
    rot = torch.polar(torch.full_like(angle, attn_factor), angle)
    return torch.view_as_real(xc * rot).flatten(-2)


def naive_mla(mla, x):
    """x [s, b, h] -> [s, b, h], head by head in float64."""
    cfg = mla.config
    s, b, _ = x.shape
    nh, dn, dr, dv = mla.num_heads, mla.dn, mla.dr, mla.dv
    eps = cfg.layernorm_epsilon

    def rms(v, w):
        return w.double() * v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)

    xd = x.double()
    if mla.q_lora_rank is None:
        q = xd @ mla.linear_q_proj.weight.double().t()
    else:
        cq = rms(xd @ mla.linear_q_down_proj.weight.double().t(), mla.q_layernorm.weight)
        q = cq @ mla.linear_q_up_proj.weight.double().t()
    kv = xd @ mla.linear_kv_down_proj.weight.double().t()
    ckv, krope = kv[..., : mla.kv_lora_rank], kv[..., mla.kv_lora_rank:]
    ckv = rms(ckv, mla.kv_layernorm.weight)
    kvu = ckv @ mla.linear_kv_up_proj.weight.double().t()
    q = q.view(s, b, nh, dn + dr)
    kvu = kvu.view(s, b, nh, dn + dv)
    if cfg.rope_type == "yarn":
        inv = naive_yarn_inv_freq(dr, cfg.rotary_base, cfg.rotary_scaling_factor,
                                  cfg.original_max_position_embeddings, cfg.beta_fast, cfg.beta_slow)
        m_all = 0.1 * cfg.mscale_all_dim * math.log(cfg.rotary_scaling_factor) + 1
        m = 0.1 * cfg.mscale * math.log(cfg.rotary_scaling_factor) + 1
        attn_factor, scale = m / m_all, (dn + dr) ** -0.5 * m_all ** 2
    else:
        inv = cfg.rotary_base ** (-torch.arange(0, dr, 2, dtype=torch.float64) / dr)
        attn_factor, scale = 1.0, (dn + dr) ** -0.5
    pos = torch.arange(s)
    out = torch.zeros(s, b, nh * dv, dtype=torch.float64)
    for j in range(b):
        kr = rotate_pairs(krope[:, j], pos, inv, attn_factor)  # [s, dr] shared by all heads
        for hd in range(nh):
            qn, qr = q[:, j, hd, :dn], rotate_pairs(q[:, j, hd, dn:], pos, inv, attn_factor)
            kn, v = kvu[:, j, hd, :dn], kvu[:, j, hd, dn:]
            scores = (qn @ kn.t() + qr @ kr.t()) * scale
            scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
            out[:, j, hd * dv:(hd + 1) * dv] = torch.softmax(scores, -1) @ v
    return out @ mla.linear_proj.weight.double().t()


@pytest.mark.parametrize("overrides", [
    {},                                       # query compression, YaRN
    {"q_lora_rank": None},                    # no query compression
    {"rope_type": "rope"},                    # plain RoPE
    {"mscale": 0.7, "mscale_all_dim": 0.5},   # attention factor != 1
])
def test_mla_matches_naive_per_head_reference(single_rank_world, overrides):
    config = get_config("deepseek-v3-tiny", **overrides)
    mla = build_mla(config)
    x = torch.randn(10, 2, config.hidden_size)
    out, bias = mla(x)
    assert bias is None
    torch.testing.assert_close(out.double(), naive_mla(mla, x), rtol=1e-4, atol=1e-5)


def test_yarn_inverse_frequencies_match_independent_formula():
    for dim, base, factor, orig in ((64, 10000, 40, 4096), (8, 10000, 4, 64), (16, 500, 8, 256)):
        got = yarn_inv_freq(dim, base, factor, orig, 32, 1)
        torch.testing.assert_close(got.double(), naive_yarn_inv_freq(dim, base, factor, orig, 32, 1),
                                   rtol=1e-6, atol=0)


def test_softmax_scale_carries_mscale_squared(single_rank_world):
    config = get_config("deepseek-v3", perform_initialization=False, use_cpu_initialization=True)
    # DeepSeek-V3: (128 + 64)^-0.5 * (0.1 ln 40 + 1)^2
    expected = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    with torch.device("meta"):
        mla = build_mla(config)
    assert abs(mla.softmax_scale - expected) < 1e-12


@pytest.mark.parametrize("method", ["forward_absorbed", "forward_expanded"])
def test_cached_decode_equals_training_path(single_rank_world, method):
    """Absorbed decoding (and, for comparison, the un-absorbed formula over the same latents)
    one token at a time over the latent cache equals the full causal forward."""
    config = get_config("deepseek-v3-tiny")
    mla = build_mla(config)
    attend = getattr(mla, method)
    s, b = 9, 2
    x = torch.randn(s, b, config.hidden_size)
    with torch.no_grad():
        full, _ = mla(x)
        pos = torch.arange(s).expand(b, s)
        # prefill the first 4 tokens, then decode one token at a time over the latent cache
        c_kv, k_rope = mla.latents(x[:4], pos[:, :4])
        outs = [attend(x[:4], pos[:, :4], c_kv, k_rope)[0]]
        for t in range(4, s):
            c_new, r_new = mla.latents(x[t:t + 1], pos[:, t:t + 1])
            c_kv, k_rope = torch.cat([c_kv, c_new], 1), torch.cat([k_rope, r_new], 1)
            outs.append(attend(x[t:t + 1], pos[:, t:t + 1], c_kv, k_rope)[0])
    assert c_kv.shape == (b, s, config.kv_lora_rank) and k_rope.shape == (b, s, config.qk_pos_emb_head_dim)
    torch.testing.assert_close(torch.cat(outs, 0), full, rtol=1e-4, atol=1e-5)


def _tp_run(rank, world, seed):
    import torch

    from megatron_dsv3.configs import get_config

    config = get_config("deepseek-v3-tiny", tensor_model_parallel_size=world,
                        expert_tensor_parallel_size=1)
    mla = build_mla(config)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 2, config.hidden_size, generator=g).requires_grad_()
    dy = torch.randn(7, 2, config.hidden_size, generator=g)
    out, _ = mla(x)
    (out * dy).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in mla.named_parameters()}


def test_tensor_parallel_heads_equal_single_rank(single_rank_world):
    from megatron_dsv3.testing.distributed import run_distributed

    ref_out, ref_dx, ref_grads = _tp_run(0, 1, 5)
    results = run_distributed(_tp_run, 2, args=(5,),
                              megatron_parallel={"tensor_model_parallel_size": 2})
    for out, dx, _ in results:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    column = ("linear_q_up_proj.weight", "linear_kv_up_proj.weight")
    for name, ref in ref_grads.items():
        shards = [r[2][name] for r in results]
        if name in column:
            got = torch.cat(shards, 0)
        elif name == "linear_proj.weight":
            got = torch.cat(shards, 1)
        else:  # replicated: identical full gradient on every rank
            got = shards[0]
            torch.testing.assert_close(shards[1], shards[0])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)


def test_value_written_padded_for_the_core_equals_the_plain_path(single_rank_world, monkeypatch):
    """On CPU MLA writes v zero-padded to the q/k head dim at once (the core attention would pad
    it): the same output and the same gradients as v handed over plain."""
    import torch.nn.functional as F

    config = get_config("deepseek-v3-tiny")
    torch.manual_seed(0)
    mla = build_mla(config)
    x = torch.randn(10, 2, config.hidden_size, requires_grad=True)
    widths, pads = [], []
    sdpa, pad = F.scaled_dot_product_attention, F.pad
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: widths.append(v.shape[-1]) or sdpa(q, k, v, **kw))
    monkeypatch.setattr(F, "pad", lambda t, p, *a, **kw: pads.append(p) or pad(t, p, *a, **kw))

    def run():
        out, _ = mla(x)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        params = [x] + [p for p in mla.parameters()]
        return out, torch.autograd.grad(out, params, g)

    out, grads = run()
    assert widths == [mla.dn + mla.dr] and pads == []  # padded by MLA, not by the core
    monkeypatch.setattr(type(mla.core_attention), "value_head_dim",
                        lambda self, dqk, dv, *a, **kw: dv)
    plain_out, plain_grads = run()
    assert widths[1] == mla.dn + mla.dr and len(pads) == 1  # now the core pads
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_mla_through_the_blocked_causal_core_matches_the_reference(single_rank_world, monkeypatch):
    """With the core running causal attention blocked (here blocks of 4 rows over 10 positions)
    MLA hands v over in its own head dim and gives the per-head float64 reference, gradients
    included (against the flash path's)."""
    from megatron_dsv3.attention import core

    config = get_config("deepseek-v3-tiny")
    torch.manual_seed(0)
    mla = build_mla(config)
    x = torch.randn(10, 2, config.hidden_size, requires_grad=True)
    g = torch.randn(10, 2, config.hidden_size)
    flash_out, _ = mla(x)
    flash_grads = torch.autograd.grad(flash_out, [x, *mla.parameters()], g)
    values = []
    apply = core._BlockedCausalAttention.apply
    monkeypatch.setattr(core._BlockedCausalAttention, "apply",
                        lambda q, k, v, *a: values.append(v.shape[-1]) or apply(q, k, v, *a))
    mla.core_attention.causal_block, mla.core_attention.blocked_min_head_dim = 4, 1
    out, _ = mla(x)
    assert values == [mla.dv]
    torch.testing.assert_close(out.double(), naive_mla(mla, x.detach()), rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out, [x, *mla.parameters()], g)
    for got, want in zip(grads, flash_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, heads_major, dv_out, per_sequence", [
    (torch.float32, True, 6, False),    # the portable core's layout, v in its own head dim
    (torch.float32, True, 10, True),    # v zero-padded to the q/k dim, positions per sequence
    (torch.float32, False, 6, False),   # [s, b, n, d] memory (e.g. Transformer Engine's core)
    (torch.float64, True, 6, False),    # through apply_rotary (no complex fast path)
    (torch.bfloat16, False, 10, True),
])
def test_qkv_assembly_equals_the_autograd_of_its_formula(dtype, heads_major, dv_out, per_sequence):
    """_AssembleQKV (one write per output, one per input gradient) against the plain formula
    through autograd: split, RoPE on q's last dr columns and on the shared k_rope, concatenation,
    k_rope expanded over the heads, v padded with zeros. Values (to the last bit, but for RoPE's
    complex product, whose vectorised and scalar loops round apart by an ulp) and every input's
    gradient, memory layout included."""
    import torch.nn.functional as F

    from megatron_dsv3.attention.mla import _AssembleQKV
    from megatron_dsv3.attention.rope import apply_rotary

    torch.manual_seed(0)
    s, b, n, dn, dr, dv = 7, 2, 3, 4, 6, 6
    q = torch.randn(s, b, n, dn + dr, dtype=dtype, requires_grad=True)
    kv = torch.randn(s, b, n, dn + dv, dtype=dtype, requires_grad=True)
    k_rope = torch.randn(s, b, dr, dtype=dtype, requires_grad=True)
    angle = torch.randn(s, b if per_sequence else 1, 1, dr // 2)
    cos, sin = angle.cos() * 1.3, angle.sin() * 1.3

    got = _AssembleQKV.apply(q, kv, k_rope, cos, sin, dn, dv_out, heads_major)
    k_rot = apply_rotary(k_rope[:, :, None, :], cos, sin).expand(s, b, n, dr)
    want = (torch.cat([q[..., :dn], apply_rotary(q[..., dn:], cos, sin)], -1),
            torch.cat([kv[..., :dn], k_rot], -1), F.pad(kv[..., dn:], (0, dv_out - dv)))
    grads = [torch.randn_like(w) for w in want]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        assert g.permute(1, 2, 0, 3).is_contiguous() if heads_major else g.is_contiguous()
        torch.testing.assert_close(g[..., :dn], w[..., :dn], rtol=0, atol=0)
        torch.testing.assert_close(g, w, rtol=3e-7 if dtype is torch.float32 else 0, atol=0)
    got_grads = torch.autograd.grad(got, (q, kv, k_rope), grads)
    want_grads = torch.autograd.grad(want, (q, kv, k_rope), grads)
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype is torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **tol)
