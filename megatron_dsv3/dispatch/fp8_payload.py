"""The dispatch payload in E4M3 with power-of-2 1x128 scales (DeepSeek-V3 section 3.3.4).

A row [h] travels as h E4M3 bytes followed by the float32 scales of its ceil(h/128) tiles, one
byte tensor per hop. It is quantised once at the source; the forwarding rank relays the bytes
unchanged and the expert's rank dequantises. The combine and every gradient travel in the compute
dtype (BF16 in BF16 training), as DeepSeek's do.
"""

from __future__ import annotations

import torch

from megatron_dsv3.fp8.quant import BLOCK, dequantize_1x128, quantize_1x128


class Fp8Payload:
    """Codec for `comm.start`/`comm.wait`: rows [n, h] <-> wire [n, h + 4 * ceil(h / 128)] uint8."""

    def __init__(self, hidden: int):
        self.hidden = hidden
        self.num_tiles = -(-hidden // BLOCK)

    @property
    def row_bytes(self) -> int:
        return self.hidden + 4 * self.num_tiles

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_1x128(rows, pow2_scales=True)  # [n, h] e4m3, [n, tiles] float32
        return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1)

    def decode(self, wire: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h = self.hidden
        q = wire[:, :h].view(torch.float8_e4m3fn)
        # a fresh copy: the scales' bytes start at offset h of each row, and a float32 view
        # needs them 4-byte aligned (contiguous() returns 0 or 1 rows as the unaligned view)
        scale = wire[:, h:].clone(memory_format=torch.contiguous_format).view(torch.float32)
        return dequantize_1x128(q, scale, dtype=dtype)
