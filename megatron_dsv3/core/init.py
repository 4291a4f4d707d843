"""Layout-independent weight initialisation.

Every weight draws from its own generator, seeded by `config.init_seed` and the weight's global
name (e.g. "layers.4.mlp.experts.17.fc1"). A rank holding a tensor-parallel slice, or a subset of
the experts, draws the full tensor of that name and keeps its slice, so any parallel layout starts
from exactly the numbers of the single-rank model.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch


def keyed_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for weight `key`: the same numbers whatever device the weight lives on."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return gen


def init_normal_(tensor: torch.Tensor, *, std: float, seed: int, key: str,
                 full_shape: Sequence[int] | None = None, dim: int = 0, rank: int = 0) -> None:
    """Fill `tensor` with N(0, std) drawn for the full tensor `key`, keeping slice `rank` along
    `dim` when the tensor is a tensor-parallel shard of `full_shape`."""
    if tensor.device.type == "meta":
        return
    full_shape = tuple(full_shape or tensor.shape)
    gen = keyed_generator(seed, key)
    with torch.no_grad():
        full = torch.empty(full_shape, dtype=torch.float32)
        full.normal_(0.0, std, generator=gen)
        if full_shape != tuple(tensor.shape):
            size = tensor.shape[dim]
            full = full.narrow(dim, rank * size, size)
        tensor.copy_(full)  # (drawn on the CPU, copied to the weight's device)


def param_device(config) -> torch.device:
    """Where parameters are created: the current CUDA device unless the config asks for CPU
    initialisation; the surrounding `torch.device(...)` context (e.g. meta) otherwise."""
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.empty(0).device
