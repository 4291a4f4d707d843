"""Reused host memory for the large CPU tensors of the hot paths.

torch keeps no cache of freed CPU memory: every CPU tensor's memory comes from malloc, and glibc
serves large requests (32 MiB and up always, smaller ones once the top of the heap was trimmed)
with freshly mapped pages, so the first write to each 4 KiB page takes a page fault. On 2 cores
that costs ~10 ms for a 32 MiB tensor before any arithmetic: gathering [16384, 512] float32 rows
(the dispatch of the `medium` benchmark model) takes 11.8 ms into a fresh tensor and 1.2 ms into
a reused one; a `medium` training step took ~95,000 page faults, most of them in the routed
experts' rows, their gradients and the grouped GEMMs' outputs.

`empty(shape, dtype, device)` hands out tensors backed by pooled storages: a storage is handed out
again only once nothing refers to it any more (no tensor, view, saved-for-backward tensor or
gradient: torch's reference count of the storage is the pool's own). CUDA tensors, small tensors
(below `MIN_BYTES`) and anything past the pool's cap (`MAX_BYTES` of pooled storage in all) come
from torch as usual. Like CUDA's caching allocator, the pool keeps freed memory for the process
instead of returning it: at most `MAX_BYTES`. `MEGATRON_DSV3_CPU_POOL=0` turns it off; so does a
torch without the reference count this relies on.

This module imports nothing of ours: core (grouped GEMM, SwiGLU) and dispatch use it.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Dict, List, Sequence

import torch

MIN_BYTES = 4 << 20
MAX_BYTES = 4 << 30

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class StoragePool:
    """Storages by size in bytes; see the module docstring."""

    def __init__(self, min_bytes: int = MIN_BYTES, max_bytes: int = MAX_BYTES):
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self.enabled = (_use_count is not None
                        and os.environ.get("MEGATRON_DSV3_CPU_POOL", "1") != "0")
        self._free: Dict[int, List[torch.UntypedStorage]] = {}
        self._bytes = 0
        self._lock = threading.Lock()  # DualPipe's overlapped pairs allocate from two threads
        self.reused = 0  # storages handed out again (for tests and benchmarks)

    def serves(self, nbytes: int, device) -> bool:
        """Whether a tensor of `nbytes` on `device` comes from the pool."""
        return self.enabled and torch.device(device).type == "cpu" and nbytes >= self.min_bytes

    def empty(self, shape: Sequence[int], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.serves(nbytes, device):
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            stored = self._free.get(nbytes, [])
            for storage in list(stored):
                if _use_count(storage._cdata) != 1:  # a tensor still uses it
                    continue
                if storage.nbytes() != nbytes:
                    # resized by its last user (selective recomputation frees an output's
                    # memory with resize_(0)): not ours to hand out any more
                    stored.remove(storage)
                    self._bytes -= nbytes
                    continue
                self.reused += 1
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
            if self._bytes + nbytes > self.max_bytes:
                return torch.empty(shape, dtype=dtype, device=device)
            storage = torch.UntypedStorage(nbytes)
            self._free.setdefault(nbytes, []).append(storage)
            self._bytes += nbytes
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def clear(self) -> None:
        """Forget every pooled storage (tensors still using one keep it alive)."""
        with self._lock:
            self._free.clear()
            self._bytes = 0

    @property
    def pooled_bytes(self) -> int:
        return self._bytes


POOL = StoragePool()


def empty(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), from `POOL` where it applies."""
    return POOL.empty(shape, dtype, device)


def serves(shape: Sequence[int], dtype: torch.dtype, device) -> bool:
    """Whether `empty(shape, dtype, device)` would come from `POOL`."""
    return POOL.serves(math.prod(shape) * dtype.itemsize, device)
