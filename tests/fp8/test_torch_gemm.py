"""The 'torch' GEMM backend's layout transforms, on CPU (torch's blockwise kernel is CUDA SM 9.x
only): the arguments TorchBlockwiseGemm hands F.scaled_mm pass torch's own shape/stride checks
(its meta kernel, run on meta tensors), and a CPU stand-in that reads the scales back by the
kernel's documented storage layout computes exactly what the emulation (Fp8BlockwiseGemm)
computes, for fprop, dgrad, wgrad and the routed experts' grouped path (same E4M3 codes)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.core.grouped_gemm import grouped_linear
from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm
from megatron_dsv3.fp8.quant import (
    GRAD_AMAX_FLOOR,
    quantize_1x128,
    quantize_128x128,
)
from megatron_dsv3.fp8.torch_gemm import (
    BLOCKS,
    TILES,
    TorchBlockwiseGemm,
    prepare,
    reference_scaled_mm,
)

SHAPES = [(64, 256, 512), (200, 300, 448), (5, 130, 200), (1, 128, 128), (130, 384, 1000)]


def _data(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)  # tiles of different scales
    w = torch.randn(N, K, generator=g) * 0.02
    dy = torch.randn(M, N, generator=g) * 1e-6  # gradient-sized: the gradient floor matters
    return x, w, dy


def _on_meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _torch_checks(args):
    """torch's F.scaled_mm on meta copies of the prepared arguments (layouts preserved): its
    meta kernel applies the CUDA path's checks (row-major a, column-major b, dims % 16, the
    scale shapes and strides of each blockwise pairing) and returns the output's meta tensor."""
    return F.scaled_mm(_on_meta(args.mat_a), _on_meta(args.mat_b), _on_meta(args.scale_a),
                       getattr(F.ScalingType, f"BlockWise{args.recipe_a}"),
                       _on_meta(args.scale_b), getattr(F.ScalingType, f"BlockWise{args.recipe_b}"),
                       output_dtype=torch.bfloat16)


def _same_up_to_accumulation_order(got, want, name):
    """Equal operands multiplied in float32 through differently laid-out BLAS calls: equal up to
    the summation order (a scale or layout slip would be O(1) off)."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale, msg=name)


class RecordingMm:
    """The CPU stand-in for F.scaled_mm that also checks each call against torch's checks."""

    def __init__(self):
        self.calls = []

    def __call__(self, args, out_dtype):
        out = _torch_checks(args)
        assert tuple(out.shape) == (args.mat_a.shape[0], args.mat_b.shape[1])
        self.calls.append((args.recipe_a, args.recipe_b, args.M, args.N, args.K))
        return reference_scaled_mm(args, out_dtype)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_fprop_dgrad_wgrad_equal_the_emulation_through_the_kernel_layouts(M, N, K, pow2):
    x, w, dy = _data(M, N, K)
    mm = RecordingMm()
    ours, ref = TorchBlockwiseGemm(pow2, mm=mm), Fp8BlockwiseGemm(pow2)
    for name, a, b in (("fprop", x, w), ("dgrad", dy, w), ("wgrad", dy, x)):
        got, want = getattr(ours, name)(a, b), getattr(ref, name)(a, b)
        assert got.shape == want.shape
        _same_up_to_accumulation_order(got, want, name)
    # fprop/dgrad pair 1x128 with 128x128, wgrad 1x128 with 1x128 (as DeepGEMM does)
    assert [c[:2] for c in mm.calls] == [(TILES, BLOCKS), (TILES, BLOCKS), (TILES, TILES)]
    assert mm.calls[2][2:] == (N, K, M)  # wgrad reduces over the tokens


def test_padding_and_scale_storage_are_the_documented_ones():
    M, N, K = 5, 130, 200  # nothing a multiple of anything
    x, w, _ = _data(M, N, K)
    (xq, xs), (wq, ws) = quantize_1x128(x), quantize_128x128(w)
    args = prepare(xq, xs, wq, ws, BLOCKS)
    kb, L4 = math.ceil(K / 128), 4
    assert args.mat_a.shape == (8, 256) and args.mat_a.stride() == (256, 1)  # rows to 4, K to 128
    assert args.mat_b.shape == (256, 256) and args.mat_b.stride() == (1, 256)  # column-major
    assert args.scale_a.shape == (8, kb) and args.scale_a.stride() == (1, 8)  # outer-dim-major
    assert args.scale_b.shape == (L4, 2) and args.scale_b.stride() == (1, L4)  # K blocks to L4
    # the padded codes are zeros (E4M3 +0), so they add nothing to any sum
    codes = args.mat_a.view(torch.uint8)
    assert not codes[M:].any() and not codes[:, K:].any()
    flat = args.scale_b.as_strided((2 * L4,), (1,), args.scale_b.storage_offset())
    assert torch.equal(flat.view(2, L4)[:, :kb], ws)  # block (j, n) at j + n * L4
    # wgrad: dW [N, K] = dy^T x, both operands 1x128 along the tokens (M = 5, padded to 128)
    (aq, as_), (bq, bs) = quantize_1x128(x[:, :N].t().contiguous()), quantize_1x128(x.t())
    args = prepare(aq, as_, bq, bs, TILES)
    assert args.mat_b.shape == (128, 208) and args.mat_b.stride() == (1, 128)  # K=200 to 16
    assert args.scale_b.shape == (208, 1) and args.scale_b.stride()[0] == 1  # one K block
    _torch_checks(args)


def test_a_wrong_layout_is_caught_by_both_torch_and_the_stand_in():
    """Control: the same scales stored row-major (what a naive caller passes) are refused by
    torch's checks, and the stand-in, reading the storage as the kernel would, computes a
    different product: the tests above would see a layout slip."""
    M, N, K = 64, 256, 512
    x, w, _ = _data(M, N, K)
    (xq, xs), (wq, ws) = quantize_1x128(x), quantize_128x128(w)
    good = prepare(xq, xs, wq, ws, BLOCKS)
    bad = prepare(xq, xs, wq, ws, BLOCKS)
    bad.scale_a = good.scale_a.contiguous()  # [M, kb] row-major: strides (kb, 1)
    with pytest.raises(RuntimeError, match="1x128 x 128x128 blockwise scaling"):
        _torch_checks(bad)
    assert not torch.allclose(reference_scaled_mm(bad), reference_scaled_mm(good))
    bad = prepare(xq, xs, wq, ws, BLOCKS)
    bad.scale_b = ws.t().contiguous()  # [kb, nb] without the padding to L4 = 4 K blocks
    with pytest.raises(RuntimeError, match="blockwise scaling"):
        _torch_checks(bad)


@pytest.mark.parametrize("N", [256, 200])  # 128-aligned experts quantise in one call; others not
def test_routed_experts_grouped_path_equals_the_emulation(N):
    G, K = 4, 384
    counts = [40, 0, 7, 81]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), K, generator=g)
    w = torch.randn(G, N, K, generator=g) * 0.02
    dy = torch.randn(sum(counts), N, generator=g) * 1e-5
    results = []
    for gemm in (TorchBlockwiseGemm(mm=RecordingMm()), Fp8BlockwiseGemm()):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = grouped_linear(xr, wr, counts, gemm)
        y.backward(dy)
        results.append((y.detach(), xr.grad, wr.grad))
    for got, want, name in zip(results[0], results[1], ("y", "dx", "dw")):
        _same_up_to_accumulation_order(got, want, name)
    assert torch.equal(results[0][2][1], torch.zeros(N, K))  # the expert without tokens


def test_bf16_inputs_come_back_in_bf16():
    x, w, _ = _data(32, 256, 256)
    y = TorchBlockwiseGemm(mm=reference_scaled_mm).fprop(x.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, Fp8BlockwiseGemm().fprop(x.bfloat16(), w.bfloat16()))


def test_whole_model_on_the_torch_backend_equals_the_emulated_model(single_rank_world,
                                                                    monkeypatch):
    """deepseek-v3-tiny built as on an H200 (capabilities by hand): every GEMM-owning module runs
    TorchBlockwiseGemm, each of its kernel calls passes torch's checks (the stand-in), and one
    training step gives the emulated model's loss and gradients (same keyed initialisation)."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.fp8 import backends, torch_gemm
    from megatron_dsv3.model import build_model

    h200 = backends.Capabilities(cuda=True, device_name="NVIDIA H200", capability=(9, 0),
                                 cuda_version=(12, 9), torch_version=(2, 13),
                                 blockwise_scaled_mm=True)
    ids = torch.randint(0, 256, (2, 32))
    pos = torch.arange(32).expand(2, 32)
    results = []
    for caps in (h200, None):
        if caps is not None:
            mm = RecordingMm()
            monkeypatch.setattr(backends, "probe", lambda: caps)
            monkeypatch.setattr(torch_gemm, "torch_scaled_mm", mm)
        else:
            monkeypatch.undo()
        model = build_model(get_config("deepseek-v3-tiny", dsv3_fp8_recipe="deepseek"))
        kinds = {type(m.gemm) for m in model.modules() if hasattr(m, "gemm")}
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        results.append((kinds, loss.detach(), [p.grad for p in model.parameters()]))
    assert results[0][0] == {TorchBlockwiseGemm} and results[1][0] == {Fp8BlockwiseGemm}
    assert len(mm.calls) > 0 and {c[:2] for c in mm.calls} == {(TILES, BLOCKS), (TILES, TILES)}
    _same_up_to_accumulation_order(results[0][1], results[1][1], "loss")
    for got, want in zip(results[0][2], results[1][2]):
        _same_up_to_accumulation_order(got, want, "grad")


def test_outer_major_scales_are_a_fresh_aligned_allocation():
    """One expert's rows of a grouped call's [R, 1] scales are already 'outer-major' as a view:
    the view was handed on, starting at an offset that is no 16-byte multiple (the layout rule
    the GPU kernels state)."""
    from megatron_dsv3.fp8.torch_gemm import outer_major

    scales = torch.rand(12, 1)
    for view in (scales[3:7], torch.rand(9, 3)[2:6]):
        out = outer_major(view)
        assert torch.equal(out, view) and out.stride() == (1, view.shape[0])
        assert out.storage_offset() == 0 and out.data_ptr() != view.data_ptr()
