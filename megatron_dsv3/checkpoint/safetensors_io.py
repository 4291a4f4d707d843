"""Streaming reads and writes of HF safetensors checkpoints, and atomic directory commits.

Reads open a shard only for the tensor being read (`safe_open` memory-maps it; closing unmaps it),
so resident memory stays at the tensors in flight. FP8 weights are dequantised on read from their
`weight_scale_inv` blocks (dequantised = block * scale_inv), also for a region of the tensor.

Writes stream: every shard's header (names, dtypes, shapes, offsets) is known from the plan before
the first byte, so each tensor goes to disk as soon as it is produced (safetensors format: 8-byte
little-endian header length, JSON header padded to 8 bytes, then the tensors' bytes back to back).
Everything is written into a hidden sibling directory that replaces the destination only once
complete; an interrupted or failed write never replaces the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import uuid
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from megatron_dsv3.checkpoint.mapping import Region, full_region
from megatron_dsv3.fp8.quant import BLOCK, dequantize_128x128

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_header(file: str) -> Dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def block_grid(shape: Sequence[int]) -> Tuple[int, int]:
    return math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory (sharded with an index, or one
    model.safetensors). Errors name the tensor and the file."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            self.index_file = index
            with open(index) as f:
                self.weight_map: Dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            self.index_file = os.path.join(path, SINGLE_FILE)
            self.weight_map = {k: SINGLE_FILE for k in read_header(self.index_file)}
        else:
            raise ValueError(f"{path!r} holds no HF checkpoint: expected {INDEX_FILE} or "
                             f"{SINGLE_FILE}")
        self._headers: Dict[str, Dict[str, dict]] = {}

    # -- metadata -----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> List[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise ValueError(f"tensor {name} is missing from the checkpoint: {self.index_file} "
                             "does not list it")
        return os.path.join(self.path, self.weight_map[name])

    def _entry(self, name: str) -> dict:
        file = self.file_of(name)
        if file not in self._headers:
            if not os.path.isfile(file):
                raise ValueError(f"tensor {name}: shard file {file} is missing ({self.index_file} "
                                 "maps the tensor to it)")
            self._headers[file] = read_header(file)
        header = self._headers[file]
        if name not in header:
            raise ValueError(f"tensor {name} is not in {file} although {self.index_file} maps it "
                             "there")
        return header[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def is_fp8(self, name: str) -> bool:
        return self.has(name + SCALE_SUFFIX)

    def check(self, name: str, shape: Sequence[int]) -> None:
        """ValueError naming tensor and file unless `name` exists with `shape` (and, for an FP8
        weight, a scale_inv with one float per 128x128 block)."""
        found = self.shape(name)
        if found != tuple(shape):
            raise ValueError(f"tensor {name} in {self.file_of(name)} has shape {list(found)}; the "
                             f"model expects {list(shape)}")
        fp8_dtype = self.dtype(name) in (torch.float8_e4m3fn, torch.float8_e5m2)
        scale = name + SCALE_SUFFIX
        if self.has(scale):
            grid = block_grid(shape) if len(shape) == 2 else None
            if grid is None or self.shape(scale) != grid:
                raise ValueError(
                    f"tensor {scale} in {self.file_of(scale)} has shape {list(self.shape(scale))}; "
                    f"a {list(shape)} weight in 128x128 blocks needs {list(grid or ())}")
            if not fp8_dtype:
                raise ValueError(f"tensor {name} in {self.file_of(name)} has a {scale} but is "
                                 f"stored as {self.dtype(name)}, not FP8")
        elif fp8_dtype:
            raise ValueError(f"FP8 tensor {name} in {self.file_of(name)} has no {scale}: "
                             "without its block scales the weight cannot be dequantised")

    # -- data ---------------------------------------------------------------------------------
    def _slice(self, name: str, region: Region) -> torch.Tensor:
        file = self.file_of(name)
        self._entry(name)  # a missing shard is reported by name
        with safe_open(file, framework="pt") as f:
            piece = f.get_slice(name)
            return piece[region] if region else f.get_tensor(name)

    def read(self, name: str, region: Optional[Region] = None) -> torch.Tensor:
        """Tensor `name` (or a rectangular region of it); FP8 weights come back dequantised in
        float32, other tensors in their stored dtype."""
        shape = self.shape(name)
        region = full_region(shape) if region is None else tuple(region)
        if not self.is_fp8(name):
            return self._slice(name, region)
        self.check(name, shape)
        (a, b), (c, d) = (s.indices(n)[:2] for s, n in zip(region, shape))
        # whole 128x128 blocks around the region, dequantised, then cropped
        r0, r1 = a // BLOCK * BLOCK, min(math.ceil(b / BLOCK) * BLOCK, shape[0])
        c0, c1 = c // BLOCK * BLOCK, min(math.ceil(d / BLOCK) * BLOCK, shape[1])
        q = self._slice(name, (slice(r0, r1), slice(c0, c1)))
        scale = self._slice(name + SCALE_SUFFIX, (slice(r0 // BLOCK, math.ceil(r1 / BLOCK)),
                                                  slice(c0 // BLOCK, math.ceil(c1 / BLOCK))))
        return dequantize_128x128(q, scale)[a - r0:b - r0, c - c0:d - c0]


# -- atomic directories -----------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = True) -> Iterator[str]:
    """Yield a hidden temporary sibling of `path` to write into; on success it becomes `path`.

    On an exception the temporary directory is removed and `path` is untouched. An existing `path`
    is replaced only after the new one is complete (renamed aside, then removed); with
    overwrite=False an existing `path` is an error before anything is written.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{os.path.basename(path)}.incomplete-{tag}")
    os.makedirs(tmp)
    try:
        yield tmp
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".{os.path.basename(path)}.replaced-{tag}")
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- streaming safetensors writer ---------------------------------------------------------------
def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in plan order, into shards of at most `max_shard_bytes`
    (a tensor larger than that gets a shard of its own), plus model.safetensors.index.json."""

    def __init__(self, directory: str, plan: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                 max_shard_bytes: int = 5 * 2**30):
        self.directory = directory
        shards: List[List[Tuple[str, torch.dtype, Tuple[int, ...]]]] = [[]]
        size = 0
        for entry in plan:
            n = _nbytes(entry[1], entry[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        total = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.shards = shards
        self.weight_map = {name: self.files[i] for i, shard in enumerate(shards) for name, _, _ in shard}
        self.total_size = sum(_nbytes(d, s) for _, d, s in plan)
        self._order = [(i, entry) for i, shard in enumerate(shards) for entry in shard]
        self._next = 0
        self._file = None

    def _open_shard(self, i: int) -> None:
        header, offset = {}, 0
        for name, dtype, shape in self.shards[i]:
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        self._file = open(os.path.join(self.directory, self.files[i]), "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name} was not planned (all planned tensors are written)")
        shard, (planned, dtype, shape) = self._order[self._next]
        if name != planned or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name} {tensor.dtype} {list(tensor.shape)} written where the "
                             f"plan expects {planned} {dtype} {list(shape)}")
        if self._next == 0 or self._order[self._next - 1][0] != shard:
            self._close_shard()
            self._open_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(data.view(torch.uint8).numpy().data)  # no copy: the buffer itself
        self._next += 1

    def finish(self) -> None:
        """Close the last shard and write the index; every planned tensor must have been written."""
        if self._next != len(self._order):
            missing = self._order[self._next][1][0]
            raise ValueError(f"checkpoint incomplete: tensor {missing} and "
                             f"{len(self._order) - self._next - 1} more were never written")
        self._close_shard()
        with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map},
                      f, indent=2)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
