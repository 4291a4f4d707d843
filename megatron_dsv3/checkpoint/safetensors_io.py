"""Streaming reads and writes of HF safetensors checkpoints, and atomic directory commits.

Reads open a shard only for the tensor being read (`safe_open` memory-maps it; closing unmaps it),
so resident memory stays at the tensors in flight. FP8 weights are dequantised on read from their
`weight_scale_inv` blocks (dequantised = block * scale_inv), also for a region of the tensor;
block scales must be float32/bfloat16, finite and > 0 on the 128x128 grid (an int32 or NaN scale
would silently give zero or NaN weights). A short, truncated or malformed shard or index is a
CheckpointFileError naming the file (and tensor).

Writes stream: every shard's header (names, dtypes, shapes, offsets) is known from the plan before
the first byte, so each tensor goes to disk as soon as it is produced (safetensors format: 8-byte
little-endian header length, JSON header padded to 8 bytes, then the tensors' bytes back to back).
Everything is written into a hidden sibling directory that replaces the destination only once
complete; an interrupted or failed write never replaces the last good checkpoint, and a full
disk is reported as "no space left on device while writing <shard>" with the partial shard removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from megatron_dsv3.checkpoint.commit import open_published
from megatron_dsv3.checkpoint.errors import CheckpointFileError, reading, writing
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
DTYPE_SIZES = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
SCALE_DTYPES = (torch.float32, torch.bfloat16)  # what a weight_scale_inv may be stored as


def read_header(file: str) -> Dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets).
    CheckpointFileError naming the file when it is too short, truncated or not safetensors."""
    with reading(file, "safetensors shard"):
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            if size < 8:
                raise CheckpointFileError(file, f"is too short to be a safetensors file: {size} "
                                                "bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointFileError(file, f"is truncated: its header length says {n} bytes "
                                                f"but only {size - 8} follow")
            header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise CheckpointFileError(file, "is not a safetensors file: its header is not a JSON "
                                        "object")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            known = entry["dtype"] in DTYPES
            elements = math.prod(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(file, "has no dtype, shape and data_offsets in the "
                                            "safetensors header", name) from None
        if not known:
            raise CheckpointFileError(file, f"has the unknown dtype {entry['dtype']!r}: allowed "
                                            f"are {sorted(DTYPES)}", name)
        if stop - start != elements * DTYPE_SIZES[entry["dtype"]]:
            raise CheckpointFileError(file, f"has data_offsets {[start, stop]} that do not hold a "
                                            f"{entry['dtype']} {entry['shape']} tensor", name)
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointFileError(
            file, f"is truncated: its header describes {end} bytes of tensor data but it holds "
                  f"{size - 8 - n}" if 8 + n + end > size else
                  f"is corrupt: {size - 8 - n - end} bytes follow the tensor data its header "
                  "describes")
    return header


def block_grid(shape: Sequence[int]) -> Tuple[int, int]:
    return math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory (sharded with an index, or one
    model.safetensors). Errors name the tensor and the file."""

    def __init__(self, path: str):
        self.path = open_published(path)
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            self.index_file = index
            with reading(index, "safetensors index"):
                with open(index) as f:
                    parsed = json.load(f)
            weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointFileError(index, "is not a safetensors index: expected a JSON "
                                                 "object with a \"weight_map\" of tensor name -> "
                                                 "shard file")
            self.weight_map: Dict[str, str] = weight_map
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            self.index_file = os.path.join(path, SINGLE_FILE)
            self.weight_map = {k: SINGLE_FILE for k in read_header(self.index_file)}
        else:
            raise ValueError(f"{path!r} holds no HF checkpoint: expected {INDEX_FILE} or "
                             f"{SINGLE_FILE}")
        self._headers: Dict[str, Dict[str, dict]] = {}
        self._scales_checked: set = set()

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

    def _check_shape(self, name: str, shape: Sequence[int]) -> None:
        found = self.shape(name)
        if found != tuple(shape):
            raise ValueError(f"tensor {name} in {self.file_of(name)} has shape {list(found)}; the "
                             f"model expects {list(shape)}")

    def check(self, name: str, shape: Sequence[int]) -> None:
        """ValueError naming tensor and file unless `name` exists with `shape` (and, for an FP8
        weight, a scale_inv with one finite, positive float32/bfloat16 per 128x128 block)."""
        self._check_shape(name, shape)
        fp8_dtype = self.dtype(name) in (torch.float8_e4m3fn, torch.float8_e5m2)
        scale = name + SCALE_SUFFIX
        if self.has(scale):
            grid = block_grid(shape) if len(shape) == 2 else None
            if grid is None or self.shape(scale) != grid:
                raise CheckpointFileError(
                    self.file_of(scale), f"has shape {list(self.shape(scale))}; a {list(shape)} "
                    f"weight in 128x128 blocks needs {list(grid or ())}", scale)
            if self.dtype(scale) not in SCALE_DTYPES:
                raise CheckpointFileError(
                    self.file_of(scale), f"is stored as {self.dtype(scale)}; block scales must be "
                    "float32 or bfloat16 (dequantised = block * scale_inv)", scale)
            if not fp8_dtype:
                raise ValueError(f"tensor {name} in {self.file_of(name)} has a {scale} but is "
                                 f"stored as {self.dtype(name)}, not FP8")
            self._check_scale_values(scale)
        elif fp8_dtype:
            raise ValueError(f"FP8 tensor {name} in {self.file_of(name)} has no {scale}: "
                             "without its block scales the weight cannot be dequantised")

    def _check_scale_values(self, scale: str) -> None:
        """Every block scale finite and > 0 (a NaN, infinite, zero or negative scale_inv turns
        its 128x128 block into NaN, zeros or sign-flipped weights). Read once per tensor."""
        if scale in self._scales_checked:
            return
        values = self._slice(scale, full_region(self.shape(scale))).float()
        bad = ~(torch.isfinite(values) & (values > 0))
        if bad.any():
            block = [int(i) for i in bad.nonzero()[0]]
            raise CheckpointFileError(
                self.file_of(scale), f"holds {int(bad.sum())} block scale(s) that are not finite "
                f"and > 0, e.g. {values[tuple(block)].item()} at block {block}; the weight would "
                "dequantise to NaN, zeros or flipped signs", scale)
        self._scales_checked.add(scale)

    # -- data ---------------------------------------------------------------------------------
    def _slice(self, name: str, region: Region) -> torch.Tensor:
        file = self.file_of(name)
        self._entry(name)  # a missing shard is reported by name
        with reading(file, "safetensors shard", tensor=name):
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
        with writing(os.path.join(self.directory, self.files[i])) as file:
            self._file = open(file, "wb")
            self._file.write(struct.pack("<Q", len(blob)) + blob)

    def _close_shard(self) -> None:
        if self._file is not None:
            with writing(self._file.name):  # (on failure the caller's abort() removes the shard)
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
        try:
            if self._next == 0 or self._order[self._next - 1][0] != shard:
                self._close_shard()
                self._open_shard(shard)
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            with writing(self._file.name):
                self._file.write(data.view(torch.uint8).numpy().data)  # no copy: the buffer itself
        except BaseException:
            self.abort()  # (a failed write leaves no partial shard)
            raise
        self._next += 1

    def finish(self) -> None:
        """Close the last shard and write the index; every planned tensor must have been written."""
        if self._next != len(self._order):
            missing = self._order[self._next][1][0]
            raise ValueError(f"checkpoint incomplete: tensor {missing} and "
                             f"{len(self._order) - self._next - 1} more were never written")
        try:
            self._close_shard()
        except BaseException:
            self.abort()
            raise
        with writing(os.path.join(self.directory, INDEX_FILE)) as file, open(file, "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map},
                      f, indent=2)

    def abort(self) -> None:
        """Close the shard being written and remove it (it is incomplete)."""
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
            with contextlib.suppress(OSError):
                os.remove(file.name)
