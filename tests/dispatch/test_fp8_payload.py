"""The FP8 dispatch wire: exactly quantize_1x128(pow2) -> dequantize_1x128 after a round trip,
h + 4*ceil(h/128) bytes per row, power-of-2 scales."""

import pytest
import torch

from megatron_dsv3.dispatch.fp8_payload import Fp8Payload
from megatron_dsv3.fp8.quant import dequantize_1x128, quantize_1x128


@pytest.mark.parametrize("rows,hidden", [(5, 256), (3, 200), (0, 64)])
def test_round_trip_equals_blockwise_quantisation_with_pow2_scales(rows, hidden):
    x = torch.randn(rows, hidden, dtype=torch.bfloat16) * 3
    codec = Fp8Payload(hidden)
    wire = codec.encode(x)
    assert wire.dtype == torch.uint8
    assert wire.shape == (rows, hidden + 4 * -(-hidden // 128)) == (rows, codec.row_bytes)
    q, scale = quantize_1x128(x, pow2_scales=True)
    assert torch.equal(codec.decode(wire, torch.bfloat16),
                       dequantize_1x128(q, scale, dtype=torch.bfloat16))
    sent_scales = wire[:, hidden:].contiguous().view(torch.float32)
    assert torch.equal(sent_scales, torch.exp2(torch.log2(sent_scales).round()))  # powers of two


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pow2_recipe_requantises_the_payload_exactly(dtype):
    """The routed experts quantise their dispatched input again (1x128 tiles along the hidden
    dim, the payload's tiling): with power-of-2 scales ('deepseek-pow2') that gives the payload's
    values back exactly; with float32 scales ('deepseek') most values round a second time, as the
    config's dsv3_dispatch_fp8 documents."""
    from megatron_dsv3.fp8.gemm import Fp8BlockwiseGemm

    h = 200
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, h, generator=g) * torch.logspace(-6, 3, 40)[:, None]).to(dtype)
    codec = Fp8Payload(h)
    received = codec.decode(codec.encode(x), dtype).float()
    assert torch.equal(Fp8BlockwiseGemm(pow2_scales=True).tiles(received), received)
    assert (Fp8BlockwiseGemm(pow2_scales=False).tiles(received) != received).float().mean() > 0.5


@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("hidden", [66, 130])
def test_hidden_sizes_that_misalign_the_scales_decode(rows, hidden):
    """The scales start at byte `hidden` of each row; with 0 or 1 rows nothing copied them to an
    aligned buffer before their float32 view (a RuntimeError on the rank that received few)."""
    x = torch.randn(rows, hidden)
    codec = Fp8Payload(hidden)
    q, scale = quantize_1x128(x, pow2_scales=True)
    assert torch.equal(codec.decode(codec.encode(x), torch.float32),
                       dequantize_1x128(q, scale, dtype=torch.float32))
