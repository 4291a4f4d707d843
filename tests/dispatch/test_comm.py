"""Hops on a one-member group (the all-to-all is a copy), checked for their autograd plumbing: the
backward of a wait issues the reverse transfer and the start's backward returns it; an FP8 wire
relayed with a row selection decodes to the quantised rows, and its gradient reaches the source
rows unquantised (the combine runs in the compute dtype)."""

import torch

from megatron_dsv3.dispatch.comm import Hop, all_to_all, start, wait
from megatron_dsv3.dispatch.counters import TrafficCounters
from megatron_dsv3.dispatch.fp8_payload import Fp8Payload
from megatron_dsv3.fp8.quant import dequantize_1x128, quantize_1x128


def test_all_to_all_forward_and_backward_with_counted_bytes():
    c = TrafficCounters()
    x = torch.randn(4, 3, requires_grad=True)
    hop = Hop([4], [4], None, ["intra"], c)
    y = all_to_all(x * 2, hop)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.equal(y, x.detach() * 2)
    assert torch.equal(x.grad, 2 * torch.arange(3.0).expand(4, 3))
    # forward 4 rows and backward 4 rows of 3 float32
    assert c.intra_node_bytes == 2 * 4 * 3 * 4


def test_fp8_relay_decodes_quantised_rows_and_passes_gradients_through():
    h, codec = 160, Fp8Payload(160)
    x = torch.randn(5, h, requires_grad=True)
    select = torch.tensor([4, 0, 0, 2])  # relayed copies: row 0 twice, rows 1 and 3 not at all
    first = Hop([5], [5], None, relayed=True)
    second = Hop([4], [4], None)
    r1 = wait(start(x, first, codec=codec), first)
    out = wait(start(r1, second, relay=first, select=select), second, codec=codec)
    want = dequantize_1x128(*quantize_1x128(x.detach(), pow2_scales=True))[select]
    assert torch.equal(out, want)
    dy = torch.randn(4, h)
    (out * dy).sum().backward()
    expected = torch.zeros(5, h).index_add_(0, select, dy)
    assert torch.equal(x.grad, expected)
