"""Fine-grained FP8 quantisation and the blockwise GEMM against float64 references."""

import math

import pytest
import torch

from megatron_dsv3.fp8.quant import (
    AMAX_FLOOR,
    E4M3_MAX,
    blockwise_matmul,
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
)


def naive_quantize_1x128(x, pow2=False, floor=AMAX_FLOOR):
    """Tile by tile in float64."""
    K = x.shape[-1]
    rows = x.reshape(-1, K).double()
    q = torch.empty_like(rows)
    scales = torch.empty(rows.shape[0], math.ceil(K / 128), dtype=torch.float64)
    for r in range(rows.shape[0]):
        for j in range(scales.shape[1]):
            tile = rows[r, j * 128:(j + 1) * 128]
            s = max(tile.abs().max().item(), floor) / E4M3_MAX
            if pow2:
                s = 2.0 ** math.ceil(math.log2(s))
            scales[r, j] = s
            q[r, j * 128:(j + 1) * 128] = (tile / s).float().to(torch.float8_e4m3fn).double()
    return q.view(x.shape), scales.view(*x.shape[:-1], -1)


@pytest.mark.parametrize("shape", [(3, 128), (2, 5, 300), (7, 64), (1, 1000)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_matches_tilewise_reference(shape, pow2):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])  # wide dynamic range along K
    q, s = quantize_1x128(x, pow2_scales=pow2)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(shape[-1] / 128))
    ref_q, ref_s = naive_quantize_1x128(x, pow2)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-6, atol=0)
    assert torch.equal(q.double(), ref_q)
    # round trip: within E4M3's relative step (2^-3) of each tile's scale
    err = (dequantize_1x128(q, s) - x).abs()
    bound = s.repeat_interleave(128, -1)[..., : shape[-1]] * 16
    assert (err <= bound).all()


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (64, 1000), (257, 129)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_128x128_blocks(shape, pow2):
    w = torch.randn(shape)
    w[: min(128, shape[0]), : min(128, shape[1])] *= 50  # one loud block must not hurt the others
    q, s = quantize_128x128(w, pow2_scales=pow2)
    nb, kb = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    assert q.shape == w.shape and s.shape == (nb, kb)
    for i in range(nb):
        for j in range(kb):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            ref = block.abs().max().item() / E4M3_MAX
            if pow2:
                ref = 2.0 ** math.ceil(math.log2(ref))
            assert abs(s[i, j].item() - ref) <= 1e-6 * ref
            deq = dequantize_128x128(q, s)[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert ((deq.double() - block).abs() <= ref * 16).all()


def test_pow2_scales_are_powers_of_two_and_never_overflow():
    x = torch.randn(4, 512) * 37.3
    q, s = quantize_1x128(x, pow2_scales=True)
    assert torch.equal(s, torch.exp2(torch.round(torch.log2(s))))
    assert (q.float().abs() <= E4M3_MAX).all()
    # with a power-of-2 scale >= amax/448, no element had to saturate
    assert ((x / s.repeat_interleave(128, -1)).abs() <= E4M3_MAX).all()


def test_zero_tile_gets_a_finite_scale_and_exact_zeros():
    x = torch.zeros(2, 256)
    x[1, 200] = 3.0
    q, s = quantize_1x128(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0, 0] == AMAX_FLOOR / E4M3_MAX
    assert (dequantize_1x128(q, s)[0] == 0).all()
    w = torch.zeros(130, 130)
    qw, sw = quantize_128x128(w)
    assert torch.isfinite(sw).all() and (dequantize_128x128(qw, sw) == 0).all()


def test_constants_are_deepseeks_with_literal_references():
    """The references above take E4M3_MAX and AMAX_FLOOR from the module; here they are
    literals: E4M3's largest finite value, DeepSeek's activation amax floor, a tile of amax A
    scaled by A / 448 with its largest element coded as 448 exactly, a zero tile by 1e-4 / 448."""
    assert E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max == 448.0
    assert AMAX_FLOOR == 1e-4
    x = torch.zeros(2, 128)
    x[0, :] = torch.linspace(-1.0, 1.0, 128) * 3.5
    x[0, 5] = -7.0
    q, s = quantize_1x128(x)
    assert s[0, 0].item() == pytest.approx(7.0 / 448.0, rel=1e-7)
    assert q[0, 5].float().item() == -448.0
    assert s[1, 0].item() == pytest.approx(1e-4 / 448.0, rel=1e-7)


@pytest.mark.parametrize("k", [-20, -5, 0, 3])
def test_pow2_scale_of_an_exact_power_of_two_is_that_power(k):
    """amax = 448 * 2^k exactly: the scale is 2^k (not 2^(k+1)), the largest code 448."""
    x = torch.full((1, 128), 448.0 * 2.0 ** k * 0.25)
    x[0, 3] = 448.0 * 2.0 ** k
    q, s = quantize_1x128(x, pow2_scales=True)
    assert s.item() == 2.0 ** k
    assert q[0, 3].float().item() == 448.0
    w = torch.full((128, 128), 448.0 * 2.0 ** k)
    _, sw = quantize_128x128(w, pow2_scales=True)
    assert sw.item() == 2.0 ** k


@pytest.mark.parametrize("k", [-20, -13, -5, 0, 3])
def test_pow2_scale_just_above_a_power_of_two_rounds_up_without_saturating(k):
    """amax = 448 * 2^k * (1 + 2^-23): a float32 log2 rounds log2(scale) down to k, and a
    scale of 2^k would push the largest element one ulp past 448. The scale must be 2^(k+1)."""
    amax = torch.nextafter(torch.tensor(448.0 * 2.0 ** k), torch.tensor(float("inf")))
    x = torch.full((1, 128), 0.5 * amax.item())
    x[0, 7] = amax
    q, s = quantize_1x128(x, pow2_scales=True)
    assert s.item() == 2.0 ** (k + 1)
    assert (x / s).abs().max() <= E4M3_MAX
    torch.testing.assert_close(dequantize_1x128(q, s)[0, 7], amax, rtol=2 ** -4, atol=0)


@pytest.mark.parametrize("pow2", [False, True])
def test_inf_and_nan_poison_their_tile_only(pow2):
    x = torch.ones(2, 256)
    x[0, 5] = float("inf")
    x[1, 130] = float("nan")
    q, s = quantize_1x128(x, pow2_scales=pow2)
    deq = dequantize_1x128(q, s)
    assert torch.isnan(s[0, 0]) and torch.isnan(s[1, 1])
    assert torch.isfinite(s[0, 1]) and torch.isfinite(s[1, 0])
    assert torch.isnan(deq[0, :128]).all() and torch.isnan(deq[1, 128:]).all()
    torch.testing.assert_close(deq[0, 128:], torch.ones(128))
    torch.testing.assert_close(deq[1, :128], torch.ones(128))
    w = torch.ones(256, 256)
    w[200, 3] = -float("inf")
    qw, sw = quantize_128x128(w, pow2_scales=pow2)
    assert torch.isnan(sw[1, 0]) and torch.isfinite(sw[[0, 0, 1], [0, 1, 1]]).all()
    deq_w = dequantize_128x128(qw, sw)
    assert torch.isnan(deq_w[128:, :128]).all() and (deq_w[:128] == 1).all()


def test_a_non_finite_tile_makes_exactly_the_outputs_it_feeds_nan():
    a, b = torch.randn(4, 256), torch.randn(256, 256)
    a[2, 10] = float("inf")  # row 2, K block 0
    b[130, 200] = float("nan")  # rows 128.. of b, K block 1
    out = blockwise_matmul(*quantize_1x128(a), *quantize_128x128(b), out_dtype=torch.float32)
    nan = torch.zeros(4, 256, dtype=torch.bool)
    nan[2, :] = True
    nan[:, 128:] = True
    assert torch.equal(torch.isnan(out), nan)


@pytest.mark.parametrize("M,N,K", [(16, 32, 128), (5, 200, 300), (33, 129, 1000)])
def test_blockwise_matmul_equals_float64_product_of_dequantised_blocks(M, N, K):
    a = torch.randn(M, K)
    b = torch.randn(N, K)
    aq, as_ = quantize_1x128(a)
    bq, bs = quantize_128x128(b)
    out = blockwise_matmul(aq, as_, bq, bs, out_dtype=torch.float32)
    assert out.shape == (M, N)
    ref = dequantize_1x128(aq, as_).double() @ dequantize_128x128(bq, bs).double().t()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    # and differs from the unquantised product only by quantisation error (a few percent)
    exact = a.double() @ b.double().t()
    assert (out.double() - exact).norm() / exact.norm() < 0.06
    assert blockwise_matmul(aq, as_, bq, bs).dtype == torch.bfloat16


@pytest.mark.parametrize("M,N,K", [(16, 256, 128), (7, 130, 300)])
def test_blockwise_matmul_with_1x128_tiles_on_both_sides_equals_float64_reference(M, N, K):
    """wgrad's GEMM: both operands in 1x128 tiles along the reduction dim (b_scale [N, kb])."""
    a, b = torch.randn(M, K), torch.randn(N, K) * torch.logspace(-2, 2, N)[:, None]
    aq, as_ = quantize_1x128(a)
    bq, bs = quantize_1x128(b)
    assert bs.shape == (N, math.ceil(K / 128))
    out = blockwise_matmul(aq, as_, bq, bs, out_dtype=torch.float32)
    ref = dequantize_1x128(aq, as_).double() @ dequantize_1x128(bq, bs).double().t()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_shape_errors_name_the_mismatch():
    aq, as_ = quantize_1x128(torch.randn(4, 256))
    bq, bs = quantize_128x128(torch.randn(8, 128))
    with pytest.raises(ValueError, match="K=256"):
        blockwise_matmul(aq, as_, bq, bs)
    with pytest.raises(ValueError, match="b_scale"):
        blockwise_matmul(aq, as_, *quantize_128x128(torch.randn(8, 256))[:1], torch.ones(3, 2))
    with pytest.raises(ValueError, match="a_scale"):
        blockwise_matmul(aq, as_[:, :1], *quantize_128x128(torch.randn(8, 256)))
    with pytest.raises(ValueError, match="amax_floor=0"):
        quantize_1x128(torch.zeros(2, 128), amax_floor=0)
    # an infinite floor made every scale inf and every dequantised value NaN, silently
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="amax_floor=(inf|nan).*finite"):
            quantize_1x128(torch.ones(2, 128), amax_floor=bad)
    # one row's scales for every row: the broadcast was applied silently (error ~200 here)
    q, s = quantize_1x128(torch.randn(4, 256) * torch.logspace(-2, 2, 4)[:, None])
    for bad in (s[0], s[:, :1], s[:3]):
        with pytest.raises(ValueError, match=r"scale has shape.*\(4, 2\) for q"):
            dequantize_1x128(q, bad)
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_128x128(torch.randn(2, 8, 256))
    with pytest.raises(ValueError, match="expected \\[1, 2\\]"):
        dequantize_128x128(quantize_128x128(torch.randn(8, 256))[0], torch.ones(2, 2))
