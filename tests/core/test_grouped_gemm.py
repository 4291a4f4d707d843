"""Grouped GEMM: torch._grouped_mm fast path and the per-group loop agree with float64 matmuls."""

import pytest
import torch

from megatron_dsv3.core.gemm import Gemm
from megatron_dsv3.core.grouped_gemm import grouped_linear


class LoopGemm(Gemm):
    """The default arithmetic forced through the per-group loop (not torch._grouped_mm)."""


@pytest.mark.parametrize("counts", [[3, 0, 5, 8], [0, 0, 16, 0], [4, 4, 4, 4]])
def test_fast_path_and_loop_match_float64_reference(counts):
    torch.manual_seed(0)
    G, K, N = len(counts), 16, 8
    x = torch.randn(sum(counts), K, requires_grad=True)
    w = torch.randn(G, N, K, requires_grad=True)
    dy = torch.randn(sum(counts), N)
    results = []
    for gemm in (None, LoopGemm()):
        x.grad = w.grad = None
        y = grouped_linear(x, w, counts, gemm)
        y.backward(dy)
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    xd, wd = x.detach().double(), w.detach().double()
    rows = torch.split(xd, counts)
    ref_y = torch.cat([r @ wd[g].t() for g, r in enumerate(rows)])
    ref_dx = torch.cat([d @ wd[g] for g, d in enumerate(torch.split(dy.double(), counts))])
    ref_dw = torch.stack([d.t() @ r for d, r in zip(torch.split(dy.double(), counts), rows)])
    for y, dx, dw in results:
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-5, atol=1e-5)
        assert dw[[g for g, c in enumerate(counts) if c == 0]].abs().sum() == 0


def test_grouped_linear_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, [2, 0, 5], LoopGemm()), (x, w))


def test_float64_takes_the_per_group_gemms_on_the_default_path(single_rank_world):
    """torch._grouped_mm refuses float64: a float64 model failed in its routed experts."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    torch.manual_seed(0)
    x = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, [8, 0, 16]), (x, w))
    model = build_model(get_config("deepseek-v3-tiny", params_dtype=torch.float64))
    ids = torch.randint(0, 256, (2, 8))
    logits = model(ids, torch.arange(8).expand(2, 8), None)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="counts"):
        grouped_linear(torch.randn(5, 4), torch.randn(2, 3, 4), [2, 2])


@pytest.mark.parametrize("counts", [
    [5, 0, 9, 2, 7],   # windows of 8 rows: past the next group's rows, the last ones shifted back
                       # (the group of 2 rows: torch's GEMM, a window would be 4x its work)
    [2, 0, 0, 0, 23],  # the last group's window shifted back by one row
    [3, 1, 2],         # 6 rows in all: no window fits, torch's GEMM for every group
])
def test_onednn_row_windows_give_each_groups_own_rows(counts, monkeypatch):
    """Rows grouped, float32, CPU: each group's GEMM runs on oneDNN over a window of rows
    rounded up to ONEDNN_ROW_BUCKET (here 8; the FLOP floor lifted), which takes in rows of the
    neighbouring groups; only the group's own rows are kept. Output and input gradient against
    the float64 per-group products, weight gradient too (torch's GEMM: it sums over rows)."""
    from megatron_dsv3.core import gemm, grouped_gemm

    if gemm.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear kernel")
    calls = []
    kernel = gemm.ONEDNN_LINEAR
    monkeypatch.setattr(gemm, "ONEDNN_LINEAR",
                        lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    monkeypatch.setattr(gemm, "ONEDNN_MIN_FLOPS", 0)
    monkeypatch.setattr(grouped_gemm, "ONEDNN_ROW_BUCKET", 8)
    torch.manual_seed(0)
    G, K, N = len(counts), 16, 12
    x = torch.randn(sum(counts), K, requires_grad=True)
    w = torch.randn(G, N, K, requires_grad=True)
    dy = torch.randn(sum(counts), N)
    y = grouped_linear(x, w, counts)
    y.backward(dy)
    windows = [(-(-n // 8) * 8, n) for n in counts if n]
    # torch's GEMM for a window longer than all rows or twice a group's rows (the group of 2)
    windows = [w_ for w_, n in windows if w_ <= sum(counts) and 2 * n > w_]
    assert calls == windows * 2 and (calls or sum(counts) < 8)  # forward and input gradient
    xd, wd, dyd = x.detach().double(), w.detach().double(), dy.double()
    ref_y = torch.cat([r @ wd[g].t() for g, r in enumerate(torch.split(xd, counts))])
    ref_dx = torch.cat([d @ wd[g] for g, d in enumerate(torch.split(dyd, counts))])
    ref_dw = torch.stack([d.t() @ r for d, r in zip(torch.split(dyd, counts),
                                                     torch.split(xd, counts))])
    for got, want in ((y, ref_y), (x.grad, ref_dx), (w.grad, ref_dw)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_cuda_grouped_mm_needs_rows_of_16_byte_multiples_too(monkeypatch):
    """torch._grouped_mm on CUDA refuses strides that are not 16-byte multiples (its meta
    checks: 'stride ... multiple of 16 bytes'); the CUDA branch took any BF16 shape on SM90 and
    experts with K or N not a multiple of 8 raised instead of taking the per-group GEMMs
    (mechanism, with a stand-in CUDA tensor: no GPU here)."""
    from types import SimpleNamespace

    from megatron_dsv3.core.grouped_gemm import _grouped_mm_usable

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: (9, 0))

    def cuda(*shape):
        return SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device="cuda:0",
                               shape=shape, element_size=lambda: 2)

    assert _grouped_mm_usable(cuda(7, 64), cuda(2, 128, 64))
    assert not _grouped_mm_usable(cuda(7, 36), cuda(2, 100, 36))
