"""HF checkpoint <-> Megatron distributed checkpoint (megatron.core.dist_checkpointing, torch_dist).

A Megatron distributed checkpoint stores each model tensor once under its sharded key with its
global shape, in chunks; any parallel layout loads the region it holds (`dist_checkpointing.load(
model.sharded_state_dict(), dir)`). The conversion writes the chunks the target layout's ranks hold
(tensor-parallel slices; one chunk per routed expert, which serves every expert-parallel size), so
each rank of that layout reads exactly its own bytes.

Streaming, in both directions, with resident memory of a few tensors:
- HF -> dist: torch.distributed.checkpoint writes one file per chunk and asks our planner for each
  chunk's data only when it writes it; the planner reads that region from the HF shards
  (dequantising FP8 blocks) at that moment.
- dist -> HF: tensors are loaded from the distributed checkpoint in batches of at most
  `batch_bytes` (routed experts in the checkpoint's own chunks) and streamed into the HF shards.
Both write into a hidden directory renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from typing import Any, Dict, Optional

import torch

from megatron_dsv3.checkpoint.errors import CheckpointFileError, reading
from megatron_dsv3.checkpoint.hf_model import ExportSource, check_hf_checkpoint, write_hf
from megatron_dsv3.checkpoint.hf_config import config_from_hf, read_hf_config
from megatron_dsv3.checkpoint.mapping import TensorMap, model_maps, tp_chunks
from megatron_dsv3.checkpoint.progress import Progress
from megatron_dsv3.checkpoint.commit import (
    atomic_directory,
    check_output_outside_input,
    open_published,
    resolve_checkpoint,
)
from megatron_dsv3.checkpoint.quantized import open_hf_reader
from megatron_dsv3.configs import layout as layout_rules

HF_CONFIG_FILE = "hf_config.json"  # the source config.json, kept for the way back
COMMON_FILE = "common.pt"  # megatron.core.dist_checkpointing's non-sharded state
# Megatron-LM's checkpoint directory: its tracker names the step directory ("release" for weights
# that are not a training step: read as iteration 0, without optimizer or RNG state)
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
RELEASE_DIR = "release"


def dist_checkpoint_dir(path: str) -> str:
    """The distributed checkpoint meant by `path`: `path` itself, or in Megatron-LM's layout (a
    tracker naming "release" or an iteration) the step directory the tracker names."""
    tracker = os.path.join(path, MEGATRON_TRACKER)
    if not os.path.isfile(tracker):
        return path
    with reading(tracker, "Megatron checkpoint tracker"):
        with open(tracker) as f:
            name = f.read().strip()
    if name == RELEASE_DIR:
        return os.path.join(path, RELEASE_DIR)
    if not name.isdigit():
        raise CheckpointFileError(f"{tracker} holds {name!r}: allowed are 'release' or an "
                                  "iteration number")
    return os.path.join(path, f"iter_{int(name):07d}")


MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")


def check_layout(config, tp: int, pp: int, ep: int, *, schedule: str = "1f1b",
                 first: Optional[int] = None, last: Optional[int] = None,
                 vpp: Optional[int] = None, names=None) -> None:
    """LayoutError (a ValueError) naming the field and its allowed values unless the layout can
    hold the model: the rules of megatron_dsv3.configs.layout, the planner's and the trainer's.

    The checkpoint itself does not depend on PP or the schedule (tensors are keyed by global layer
    numbers, so any pipeline layout loads it); they are checked so that the conversion refuses
    what the training run would refuse: `schedule` (Megatron's '1f1b' by default, or
    'interleaved' with `vpp`, 'dualpipe', 'dualpipev') and the uneven split `first` / `last`
    (Megatron's num_layers_in_first/last_pipeline_stage). `names`: how messages name them
    (default the config fields; the command line passes its flags, layout_rules.FLAGS)."""
    layout_rules.check_layout(config, tp=tp, pp=pp, ep=ep, schedule=schedule, first=first,
                              last=last, vpp=vpp, names=names or layout_rules.FIELDS)


# -- HF -> dist ---------------------------------------------------------------------------------
def _write_items(maps: Dict[str, TensorMap], dtype: torch.dtype, tp: int):
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    items = []
    for key, m in maps.items():
        props = TensorProperties(dtype=m.dtype_override or dtype)
        for offset, shape in tp_chunks(m, tp):
            items.append(WriteItem(
                index=MetadataIndex(key, torch.Size(offset)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape)),
                    properties=props, size=torch.Size(m.shape))))
    return items


def _streaming_planner(items, resolve):
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

    class StreamingSavePlanner(SavePlanner):
        """Write items fixed in advance; each item's data is produced when the writer asks."""

        def set_up_planner(self, state_dict=None, storage_meta=None, is_coordinator=True):
            pass

        def create_local_plan(self):
            return SavePlan(list(items))

        def create_global_plan(self, all_plans):
            return create_default_global_save_plan(all_plans)

        def finish_plan(self, new_plan):
            return new_plan

        def resolve_data(self, write_item):
            return resolve(write_item)

    return StreamingSavePlanner()


def hf_to_dist(hf_path: str, out_path: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
               dtype: torch.dtype = torch.bfloat16, allow_unused: bool = False,
               overwrite: bool = False, progress: bool = True, schedule: str = "1f1b",
               first: Optional[int] = None, last: Optional[int] = None,
               vpp: Optional[int] = None, megatron_release: bool = False,
               layout_names=None) -> None:
    """Convert the HF checkpoint at `hf_path` into a Megatron distributed checkpoint at `out_path`
    laid out for a TP x PP x EP run, parameters in `dtype` (the router stays float32). The
    layout (`schedule`, uneven split `first`/`last`, `vpp`) is checked by `check_layout`.
    `megatron_release`: in Megatron-LM's directory layout (`out_path/release` and a tracker
    saying "release"), which Megatron-LM's --load / --pretrained-checkpoint read as starting
    weights; without a tracker Megatron-LM would start from random weights with a warning.
    `layout_names`: how layout errors name the sizes (default the config fields)."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    check_output_outside_input(hf_path, out_path)
    hf = read_hf_config(hf_path)
    if hf.get("quantization_config") and dtype in (torch.bfloat16, torch.float16):
        warnings.warn(
            f"{hf_path} holds quantised weights, dequantised here into {dtype}: their values are "
            "rounded, so an FP8 export of this checkpoint (dist_to_hf) will not reproduce the "
            "source's block scales (they move by up to ~0.4%); convert with dtype=torch.float32 "
            "(--dtype fp32) for an exact way back", stacklevel=2)
    # (from the path: a checkpoint without MTP weights, as transformers saves them, converts
    # without MTP, with a warning, and its stored config then says so)
    config = config_from_hf(hf_path, dtype=dtype)
    hf = dict(hf, num_nextn_predict_layers=config.mtp_num_layers or 0)
    check_layout(config, tp, pp, ep, schedule=schedule, first=first, last=last, vpp=vpp,
                 names=layout_names)
    maps = model_maps(config, rope_interleave=hf.get("rope_interleave", True))
    reader = open_hf_reader(hf_path, hf)
    check_hf_checkpoint(reader, maps, config, allow_unused)
    items = _write_items(maps, dtype, tp)
    bar = Progress("hf->dist", sum(torch.Size(i.tensor_data.chunk.sizes).numel()
                                   * torch.empty((), dtype=i.tensor_data.properties.dtype).element_size()
                                   for i in items), enabled=progress)

    def resolve(item):
        chunk = item.tensor_data.chunk
        region = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))
        tensor = maps[item.index.fqn].read(reader, region)
        tensor = tensor.to(item.tensor_data.properties.dtype).contiguous()
        bar.update(tensor.numel() * tensor.element_size())
        return tensor

    with atomic_directory(out_path, overwrite) as top:
        tmp = top
        if megatron_release:
            tmp = os.path.join(top, RELEASE_DIR)
            os.makedirs(tmp)
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False, thread_count=1)
        try:
            dcp.save({}, storage_writer=writer, planner=_streaming_planner(items, resolve),
                     no_dist=True)
        except dcp.api.CheckpointException as wrapped:
            # torch wraps whatever our reads raised (a bad tensor, an interrupt): re-raise it
            (error, _), = wrapped.failures.values()
            raise error from None
        save_config(CheckpointingConfig("torch_dist"), tmp)
        # (Megatron-LM reads a checkpoint without a version as version 0 and runs its QKV
        # reordering fix-up for such old checkpoints on loading: its own saves say 3.0)
        torch.save({"checkpoint_version": 3.0}, os.path.join(tmp, COMMON_FILE))
        with open(os.path.join(tmp, HF_CONFIG_FILE), "w") as f:
            json.dump(hf, f, indent=2)
        if megatron_release:
            with open(os.path.join(top, MEGATRON_TRACKER), "w") as f:
                f.write(RELEASE_DIR)
    bar.close()


# -- dist -> HF ---------------------------------------------------------------------------------
@contextlib.contextmanager
def process_group():
    """torch.distributed as megatron.core.dist_checkpointing needs it: the caller's group, or a
    one-process gloo group for the duration."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def dist_metadata(path: str) -> Dict[str, Any]:
    """The tensors (key -> metadata) a distributed checkpoint stores; CheckpointFileError naming
    its .metadata file when that is missing, truncated or not torch.distributed.checkpoint's."""
    from torch.distributed.checkpoint import FileSystemReader

    with reading(os.path.join(path, ".metadata"), "distributed checkpoint metadata"):
        return FileSystemReader(path).read_metadata().state_dict_metadata


class _DistSource(ExportSource):
    """Our tensors from a distributed checkpoint, loaded in batches of at most `batch_bytes`."""

    def __init__(self, path: str, maps: Dict[str, TensorMap], allow_unused: bool,
                 batch_bytes: int):
        self.path, self.batch_bytes = path, batch_bytes
        stored = dist_metadata(path)
        self.keys, self.chunks = {}, {}
        for key in maps:
            md = stored.get(key)
            if md is None or not hasattr(md, "size"):
                raise ValueError(f"tensor {key} is missing from the distributed checkpoint {path}")
            self.keys[key] = (tuple(md.size), md.properties.dtype)
            self.chunks[key] = md.chunks
        unused = [k for k in stored if k.startswith(MODEL_PREFIXES) and k not in maps]
        if unused and not allow_unused:
            raise ValueError(f"{len(unused)} model tensor(s) of {path} have no place in the HF "
                             f"config, e.g. {unused[:4]}; pass allow_unused=True (--allow-unused) "
                             "to leave them out knowingly")
        self.order = [(k, s, e) for k in maps for s, e in self.units(k)]
        self.cursor, self.cache = 0, {}

    def units(self, key):
        shape = self.keys[key][0]
        if len(shape) != 3:
            return super().units(key)
        # routed experts: the checkpoint's own chunks if they tile the expert axis evenly
        ranges = sorted({(c.offsets[0], c.offsets[0] + c.sizes[0]) for c in self.chunks[key]})
        size = ranges[0][1] - ranges[0][0]
        if ranges == [(s, s + size) for s in range(0, shape[0], size)]:
            return ranges
        return [(e, e + 1) for e in range(shape[0])]

    def _load_batch(self) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request, size = {}, 0
        while self.cursor < len(self.order):
            key, start, stop = self.order[self.cursor]
            shape, dtype = self.keys[key]
            nbytes = torch.Size((stop - start, *shape[1:])).numel() * torch.empty(
                (), dtype=dtype).element_size()
            if request and size + nbytes > self.batch_bytes:
                break
            buf = torch.empty((stop - start, *shape[1:]), dtype=dtype)
            offsets = () if stop - start == shape[0] else (
                (0, start // (stop - start), shape[0] // (stop - start)),)
            request[(key, start)] = ShardedTensor.from_rank_offsets(key, buf, *offsets)
            size += nbytes
            self.cursor += 1
        # a partial read: Megatron's check that the request covers every tensor does not apply
        with reading(self.path, "distributed checkpoint"):
            loaded = dist_checkpointing.load({f"{k}@{s}": v for (k, s), v in request.items()},
                                             self.path, validate_access_integrity=False)
        self.cache.update({(k, s): loaded[f"{k}@{s}"] for (k, s) in request})

    def fetch(self, key, start, stop):
        if (key, start) not in self.cache:
            self._load_batch()
        return self.cache.pop((key, start))


def dist_to_hf(dist_path: str, out_path: str, *, hf_config: Optional[Any] = None,
               fp8: bool = True, allow_unused: bool = False, overwrite: bool = False,
               max_shard_bytes: int = 5 * 2**30, batch_bytes: int = 256 * 2**20,
               progress: bool = True) -> None:
    """Convert a Megatron distributed checkpoint of our model into an HF checkpoint.

    `hf_config` (a config.json path/directory or dict) describes the model; by default the one the
    HF -> dist conversion stored next to the checkpoint. fp8=True writes DeepSeek's FP8 layout.
    """
    check_output_outside_input(dist_path, out_path)
    dist_path = dist_checkpoint_dir(open_published(dist_path))
    if not os.path.isfile(os.path.join(dist_path, ".metadata")):
        trainer = None
        with contextlib.suppress(ValueError):  # (nothing of our trainer's there either)
            trainer = resolve_checkpoint(dist_path)
        if trainer is not None:
            raise ValueError(f"{dist_path} holds our trainer's checkpoint ({trainer}), not a "
                             "distributed checkpoint: convert --to hf reads distributed "
                             "checkpoints (.metadata); python -m megatron_dsv3.generate and "
                             "python -m megatron_dsv3.export read trainer checkpoints directly")
    if hf_config is None:
        stored = os.path.join(dist_path, HF_CONFIG_FILE)
        if not os.path.isfile(stored):
            raise ValueError(f"{dist_path} has no {HF_CONFIG_FILE}; pass hf_config= (--hf-config) "
                             "with the config.json of the model")
        hf_config = stored
    hf = hf_config if isinstance(hf_config, dict) else read_hf_config(hf_config)
    embedding = dist_metadata(dist_path).get("embedding.word_embeddings.weight")
    dtype = embedding.properties.dtype if embedding is not None else torch.float32
    config = config_from_hf(hf, dtype=dtype)  # (the dtype written to config.json)
    maps = model_maps(config)
    with process_group():
        source = _DistSource(dist_path, maps, allow_unused, batch_bytes)
        write_hf(source, config, out_path, fp8=fp8, base_config=hf,
                 max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress,
                 label="dist->hf")
