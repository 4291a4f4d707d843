"""DeepSeek-V3 HF checkpoints into and out of our model, on any parallel layout.

    config = config_from_hf(path, dtype=torch.bfloat16)       # HF config.json -> DeepSeekV3Config
    model = build_model(config); load_hf(model, path)          # fills this rank's TP/PP/EP slice
    save_hf(model, out, fp8=True)                              # DeepSeek's layout, FP8 blocks

Both directions go through the model's own `sharded_state_dict`: every ShardedTensor names a
global tensor and the region of it this rank holds, so loading reads exactly that region from the HF
files (no communication), and saving gathers the main replicas' regions to rank 0, which streams
the HF shards. Nothing is silently dropped: a checkpoint tensor the model does not use (unless
allow_unused, or skip_mtp for the MTP layers), a model tensor the checkpoint lacks (for missing MTP
layers, with what to do about them), or an architecture field that differs from the model's
config is an error naming it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from megatron_dsv3.checkpoint.hf_config import (
    config_fields_from_hf,
    config_from_hf,
    config_to_hf,
    read_hf_config,
    scale_format,
)
from megatron_dsv3.checkpoint.errors import describe, rank0_failure, writing
from megatron_dsv3.checkpoint.mapping import TensorMap, mirror_names, model_maps
from megatron_dsv3.checkpoint.progress import Progress
from megatron_dsv3.checkpoint.commit import atomic_directory
from megatron_dsv3.checkpoint.quantized import open_hf_reader
from megatron_dsv3.checkpoint.safetensors_io import (
    INDEX_FILE,
    SCALE_SUFFIX,
    HFReader,
    ShardedSafetensorsWriter,
    block_grid,
)

__all__ = ["config_from_hf", "config_to_hf", "load_hf", "save_hf", "write_hf", "local_shards",
           "check_hf_checkpoint", "check_architecture", "ExportSource", "hf_plan"]

# Fields of config_fields_from_hf that do not change any weight (checked: everything else).
_NOT_ARCHITECTURE = {"init_method_std", "max_position_embeddings", "mtp_num_layers",
                     "first_k_dense_replace"}


def is_weight_file(name: str) -> bool:
    """The files of an HF checkpoint its manifest covers: shards and their index."""
    return name.endswith(".safetensors") or name == INDEX_FILE


# -- the model side -------------------------------------------------------------------------------
def _chunks(model) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def local_shards(model) -> list:
    """This rank's ShardedTensors (SwiGLU factories built into their [gate | up] pieces)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    out = []
    for chunk in _chunks(model):
        # (metadata={} rather than None: megatron-core 0.16's GPTModel reads metadata['dp_cp_group']
        # on a stage that holds MTP without the embedding, and only a dict gets it filled in)
        for value in nested_values(chunk.sharded_state_dict(metadata={})):
            if isinstance(value, ShardedTensorFactory):
                built = value.build()
                out += [v for v in nested_values(built if isinstance(built, dict)
                                                 else {i: b for i, b in enumerate(built)})]
            elif isinstance(value, ShardedTensor):
                out.append(value)
            elif isinstance(value, ShardedObject) and value.data is None:
                continue  # an empty extra state
            else:
                raise ValueError(f"{getattr(value, 'key', value)}: a {type(value).__name__} in the "
                                 "model's sharded_state_dict has no HF counterpart")
    for sh in out:
        if sh.prepend_axis_num or sh.flattened_range is not None:
            raise ValueError(f"{sh.key}: only per-layer keys are supported (prepend_axis_num="
                             f"{sh.prepend_axis_num}, flattened_range={sh.flattened_range}); "
                             "build the model with a per-layer moe_layer_freq list")
    return out


def _region(sh) -> Tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset, sh.local_shape))


def _model_config(model):
    return _chunks(model)[0].config


# -- checks --------------------------------------------------------------------------------------
def check_architecture(config, hf: Dict[str, Any]) -> None:
    """ValueError naming the first HF config field whose value the model was not built with."""
    from megatron_dsv3.configs import latent_norm_epsilon
    from megatron_dsv3.configs.presets import moe_layer_pattern

    wanted = config_fields_from_hf(hf)
    pattern = moe_layer_pattern(config.num_layers,
                                min(wanted["first_k_dense_replace"], config.num_layers))
    if list(config.moe_layer_freq) != pattern:
        raise ValueError(f"HF config first_k_dense_replace={hf.get('first_k_dense_replace')} "
                         f"does not match the model's moe_layer_freq={config.moe_layer_freq}")
    for field, value in wanted.items():
        if field in _NOT_ARCHITECTURE:
            continue
        ours = getattr(config, field, None)
        if field == "dsv3_latent_norm_epsilon":  # (None: layernorm_epsilon, the same number)
            ours = latent_norm_epsilon(config)
        if ours != value:
            raise ValueError(f"HF config gives {field}={value!r} but the model was built with "
                             f"{field}={ours!r}; build it with config_from_hf(<checkpoint>)")


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def is_mtp_tensor(name: str, num_layers: int) -> bool:
    """Whether HF tensor `name` is an MTP module's (model.layers.{L + k}.*, L = num_layers)."""
    match = _HF_LAYER.match(name)
    return match is not None and int(match.group(1)) >= num_layers


def check_hf_checkpoint(reader: HFReader, maps: Dict[str, TensorMap], config,
                        allow_unused: bool = False, *, skip_mtp: bool = False) -> None:
    """Before any weight is read: every tensor the model needs exists with its shape (FP8 weights
    with their block scales), and every tensor of the checkpoint is used (unless allow_unused;
    skip_mtp: except the MTP layers', for a model built without them)."""
    needed = [t for m in maps.values() for t in m.hf_tensors()]
    missing = [t.name for t in needed if not reader.has(t.name)]
    if missing:
        message = (f"tensor {missing[0]} is missing from the checkpoint: {reader.index_file} does "
                   "not list it")
        if len(missing) > 1:
            message += (f" (nor {len(missing) - 1} other tensor(s) the model needs, e.g. "
                        f"{missing[1:5]})")
        L = config.num_layers
        if (all(is_mtp_tensor(n, L) for n in missing)
                and not any(is_mtp_tensor(n, L) for n in reader.names())):
            message += (f"; the checkpoint holds no MTP layers (model.layers.{L}.*"
                        ": transformers' save_pretrained writes none): build the model without "
                        "them (config_from_hf and from_hf do unless given mtp=True, or "
                        "mtp_num_layers=None)")
        raise ValueError(message)
    used = set()
    for t in needed:
        reader.check(t.name, t.shape)
        used.update((t.name, t.name + SCALE_SUFFIX))
    for copy, original in mirror_names(config):
        if reader.has(copy):
            reader.check(copy, reader.shape(original))
            used.update((copy, copy + SCALE_SUFFIX))  # (an FP8 copy of the head has scales)
    unused = [n for n in reader.names() if n not in used
              and not (skip_mtp and is_mtp_tensor(n, config.num_layers))]
    if unused and not allow_unused:
        raise ValueError(
            f"{len(unused)} tensor(s) of {reader.index_file} are not used by the model, e.g. "
            f"{unused[:4]}; pass allow_unused=True (--allow-unused) to leave them out knowingly "
            "(or skip_mtp=True for the MTP layers of a model built with mtp_num_layers=None)")


# -- load -------------------------------------------------------------------------------------
def load_hf(model, path: str, *, allow_unused: bool = False, skip_mtp: bool = False,
            progress: bool = False) -> None:
    """Fill the slice of the model this rank holds (any TP/PP/EP layout; `model` may be a list of
    virtual-pipeline chunks) from the HF checkpoint at `path` (BF16/FP32, or FP8 with 128x128
    weight_scale_inv blocks, dequantised on read). skip_mtp=True leaves the checkpoint's MTP
    layers unread (a model built without MTP); allow_unused=True leaves any unused tensor."""
    hf = read_hf_config(path)
    config = _model_config(model)
    check_architecture(config, hf)
    maps = model_maps(config, rope_interleave=hf.get("rope_interleave", True))
    reader = open_hf_reader(path, hf)
    check_hf_checkpoint(reader, maps, config, allow_unused, skip_mtp=skip_mtp)
    shards = local_shards(model)
    for sh in shards:
        if sh.key not in maps:
            raise ValueError(f"model tensor {sh.key} has no counterpart in the HF layout")
        if tuple(sh.global_shape) != tuple(maps[sh.key].shape):
            raise ValueError(f"model tensor {sh.key} has global shape {list(sh.global_shape)}; the "
                             f"HF checkpoint gives {list(maps[sh.key].shape)}")
    bar = Progress("load_hf", sum(sh.data.numel() * sh.data.element_size() for sh in shards),
                   enabled=progress)
    with torch.no_grad():
        for sh in shards:
            sh.data.copy_(maps[sh.key].read(reader, _region(sh)))
            bar.update(sh.data.numel() * sh.data.element_size())
    bar.close()


# -- save -------------------------------------------------------------------------------------
class ExportSource:
    """Where an export reads our tensors from: `keys` (key -> (global shape, dtype)), the dim-0
    ranges to fetch each key in (`units`), and `fetch(key, start, stop)`."""

    keys: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]

    def units(self, key: str) -> List[Tuple[int, int]]:
        return [(0, self.keys[key][0][0])]

    def fetch(self, key: str, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


def hf_plan(maps: Dict[str, TensorMap], dtypes: Dict[str, torch.dtype], config, fp8: bool
            ) -> List[Tuple[str, torch.dtype, Tuple[int, ...]]]:
    """(name, dtype, shape) of every HF tensor an export writes, in writing order."""
    copies = _copies_of(config)
    plan = []
    for key, m in maps.items():
        for t in m.hf_tensors():
            if fp8 and t.fp8:
                plan += [(t.name, torch.float8_e4m3fn, t.shape),
                         (t.name + SCALE_SUFFIX, torch.float32, block_grid(t.shape))]
            else:
                plan.append((t.name, dtypes[key], t.shape))
            plan += [(c, dtypes[key], t.shape) for c in copies.get(t.name, ())]
    return plan


def _copies_of(config) -> Dict[str, List[str]]:
    copies: Dict[str, List[str]] = {}
    for copy, original in mirror_names(config):
        copies.setdefault(original, []).append(copy)
    return copies


def write_hf(source: ExportSource, config, path: str, *, fp8: bool = True,
             base_config: Optional[Dict[str, Any]] = None, rope_interleave: Optional[bool] = None,
             max_shard_bytes: int = 5 * 2**30, overwrite: bool = True, progress: bool = False,
             label: str = "save_hf", ready: Optional[Callable[[], None]] = None) -> None:
    """Stream an HF checkpoint of `config`'s model from `source` into `path` (atomically).

    `ready` is called once every check has passed and the directory is open, before the first
    fetch: what fails before it fetched nothing."""
    from megatron_dsv3.fp8 import quant

    if rope_interleave is None:
        rope_interleave = (base_config or {}).get("rope_interleave", True)
    # the source's scale format: power-of-2 block scales ("ue8m0", later DeepSeek-V3 releases)
    # are written as such again (amax / 448 scales would change every scale and code)
    pow2 = scale_format(base_config) == "ue8m0"
    maps = model_maps(config, rope_interleave)
    missing = [k for k in maps if k not in source.keys]
    if missing:
        raise ValueError(f"cannot write the HF checkpoint: {len(missing)} model tensor(s) are held "
                         f"by no rank / absent from the source, e.g. {missing[:4]}")
    extra = [k for k in source.keys if k not in maps]
    if extra:
        raise ValueError(f"model tensor(s) {extra[:4]} have no counterpart in the HF layout")
    for key, m in maps.items():
        if tuple(source.keys[key][0]) != tuple(m.shape):
            raise ValueError(f"tensor {key} has shape {list(source.keys[key][0])}; the config "
                             f"implies {list(m.shape)}")
    dtypes = {k: v[1] for k, v in source.keys.items()}
    plan = hf_plan(maps, dtypes, config, fp8)
    copies = _copies_of(config)
    quantised = {t.name for m in maps.values() for t in m.hf_tensors() if fp8 and t.fp8}
    bar = Progress(label, sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                              for _, d, s in plan), enabled=progress)
    # the manifest covers the weights: config.json and tokenizer files are the user's to edit
    with atomic_directory(path, overwrite, covers=is_weight_file) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes)
        if ready is not None:
            ready()
        try:
            for key, m in maps.items():
                for start, stop in source.units(key):
                    tensor = source.fetch(key, start, stop)
                    for name, t in m.split(tensor, start):
                        if name in quantised:
                            q, scale = quant.quantize_128x128(t, pow2_scales=pow2)
                            writer.write(name, q)
                            writer.write(name + SCALE_SUFFIX, scale)
                            bar.update(q.numel() + scale.numel() * 4)
                        else:
                            for n in (name, *copies.get(name, ())):
                                writer.write(n, t.contiguous())
                                bar.update(t.numel() * t.element_size())
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        hf_config = config_to_hf(config, base_config, fp8=fp8, rope_interleave=rope_interleave)
        with writing(os.path.join(tmp, "config.json")) as file, open(file, "w") as f:
            json.dump(hf_config, f, indent=2)
    bar.close()


class _ModelSource(ExportSource):
    """The model's main-replica pieces, gathered to rank 0 piece by piece (point-to-point)."""

    def __init__(self, model):
        import torch.distributed as dist
        from megatron.core.dist_checkpointing.mapping import is_main_replica

        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        mine = [sh for sh in local_shards(model) if is_main_replica(sh.replica_id)]
        self.local = {(sh.key, tuple(sh.global_offset)): sh.data for sh in mine}
        meta = [(sh.key, tuple(sh.global_shape), tuple(sh.global_offset), tuple(sh.local_shape),
                 sh.data.dtype) for sh in mine]
        gathered = [meta]
        if self.distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, meta)
        self.pieces: Dict[str, List[Tuple[int, Tuple[int, ...], Tuple[int, ...]]]] = {}
        self.received = set()  # rank 0: (key, rank, offset) of the pieces it received
        self.keys = {}
        for rank, entries in enumerate(gathered):
            for key, shape, offset, local_shape, dtype in entries:
                self.keys[key] = (shape, dtype)
                self.pieces.setdefault(key, []).append((rank, offset, local_shape))
        for key, pieces in self.pieces.items():
            pieces.sort(key=lambda p: (p[1], p[0]))
            covered = sum(torch.Size(p[2]).numel() for p in pieces)
            if covered != torch.Size(self.keys[key][0]).numel():
                raise ValueError(f"tensor {key}: the main replicas hold {covered} of its "
                                 f"{torch.Size(self.keys[key][0]).numel()} elements")

    def units(self, key):
        if len(self.keys[key][0]) == 3:  # routed experts: one unit per piece of experts
            return sorted({(p[1][0], p[1][0] + p[2][0]) for p in self.pieces[key]})
        return super().units(key)

    def _pieces_in(self, key, start, stop):
        return [p for p in self.pieces[key] if start <= p[1][0] and p[1][0] + p[2][0] <= stop]

    def fetch(self, key, start, stop):
        import torch.distributed as dist

        shape, dtype = self.keys[key]
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        for rank, offset, local_shape in self._pieces_in(key, start, stop):
            if rank == self.rank:
                data = self.local[(key, offset)].detach().cpu()
            else:
                data = torch.empty(local_shape, dtype=dtype)
                dist.recv(data, src=rank)
                self.received.add((key, rank, offset))
            index = [slice(o, o + n) for o, n in zip(offset, local_shape)]
            index[0] = slice(offset[0] - start, offset[0] - start + local_shape[0])
            out[tuple(index)] = data
        return out

    def serve(self, keys: Iterable[str]) -> None:
        """Non-zero ranks: send this rank's pieces in the order rank 0 fetches them."""
        import torch.distributed as dist

        for key, rank, offset, _ in self._order(keys):
            if rank == self.rank:
                dist.send(self.local[(key, offset)].detach().cpu().contiguous(), dst=0)

    def drain(self, keys: Iterable[str]) -> None:
        """Rank 0, after its writing failed: receive (and drop) the pieces the other ranks still
        send, so that they finish serving and learn of the failure instead of waiting."""
        import torch.distributed as dist

        for key, rank, offset, local_shape in self._order(keys):
            if rank != self.rank and (key, rank, offset) not in self.received:
                dist.recv(torch.empty(local_shape, dtype=self.keys[key][1]), src=rank)
                self.received.add((key, rank, offset))

    def _order(self, keys: Iterable[str]):
        """(key, rank, offset, local shape) of every piece, in the order rank 0 fetches them."""
        for key in keys:
            for start, stop in self.units(key):
                for rank, offset, local_shape in self._pieces_in(key, start, stop):
                    yield key, rank, offset, local_shape


def save_hf(model, path: str, fp8: bool = True, *, base_config: Optional[Dict[str, Any]] = None,
            rope_interleave: Optional[bool] = None, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = True, progress: bool = False) -> None:
    """Write the model (all ranks call this; rank 0 writes) as a DeepSeek-V3 HF checkpoint.

    fp8=True quantises the linear weights DeepSeek quantises to E4M3 128x128 blocks with float32
    `weight_scale_inv` and adds `quantization_config`; other tensors keep the model's dtype.
    `base_config` (an HF config.json dict) keeps the non-architecture fields (token ids, ...).
    The MTP layers' embedding and head copies are written as DeepSeek does.

    A refusal or failure on rank 0 is raised on every rank: one found before any transfer (the
    output, the model's tensors) at once; one while writing (a full disk) once the other ranks
    have sent their pieces, which rank 0 then receives and drops.
    """
    import torch.distributed as dist

    config = _model_config(model)
    source = _ModelSource(model)
    what = f"write the HF checkpoint {path}"
    if not source.distributed:
        write_hf(source, config, path, fp8=fp8, base_config=base_config,
                 rope_interleave=rope_interleave, max_shard_bytes=max_shard_bytes,
                 overwrite=overwrite, progress=progress)
        return
    if source.rank != 0:
        start = [None]  # rank 0's refusal, or None: the pieces are wanted
        dist.broadcast_object_list(start, src=0)
        if start[0] is not None:
            raise rank0_failure(start[0], what)
        source.serve(model_maps(config))
        outcome = [None]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise rank0_failure(outcome[0], what)
        return
    started = []

    def ready():
        started.append(True)
        dist.broadcast_object_list([None], src=0)

    try:
        write_hf(source, config, path, fp8=fp8, base_config=base_config,
                 rope_interleave=rope_interleave, max_shard_bytes=max_shard_bytes,
                 overwrite=overwrite, progress=progress, ready=ready)
    except Exception as error:
        if started:  # (else the others wait to start, and raise it at once)
            source.drain(model_maps(config))
        dist.broadcast_object_list([describe(error)], src=0)
        raise
    dist.broadcast_object_list([None], src=0)
