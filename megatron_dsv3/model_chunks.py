"""DeepSeek-V3 model chunks for DualPipe and DualPipeV: this pipeline rank's two DeepSeekV3Models.

Where each layer goes is the pipeline's placement (megatron_dsv3.pipeline.placement.StageLayers:
DualPipeV's V, DualPipe's mirrored stages, Megatron's uneven first/last split). Megatron's own
layer offset (contiguous stages, one chunk per rank or interleaved) does not describe it, so each
chunk gets a block spec with one layer spec per layer, carrying the layer's global number as the
`global_number` param of DeepSeekV3TransformerLayer: dense or MoE, keyed initial weights and
checkpoint keys follow from it.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_dsv3.layer_specs import get_layer_spec, norm_spec
from megatron_dsv3.model import DeepSeekV3Model
from megatron_dsv3.pipeline.placement import StageLayers
from megatron_dsv3.pipeline.schedules import check_ranks, layout

SCHEDULES = ("dualpipev", "dualpipe")


def layer_spec_at(spec: ModuleSpec, global_number: int) -> ModuleSpec:
    """`spec` (a DeepSeekV3TransformerLayer spec) for the layer with 1-based global number
    `global_number`."""
    return dataclasses.replace(spec, params={**spec.params, "global_number": global_number})


def chunk_block_spec(config, global_numbers: List[int],
                     use_te: Optional[bool] = None) -> TransformerBlockSubmodules:
    """The decoder block of a chunk holding the layers `global_numbers` (consecutive, 1-based)."""
    spec = get_layer_spec(config, use_te=use_te)
    return TransformerBlockSubmodules(layer_specs=[layer_spec_at(spec, n) for n in global_numbers],
                                      layer_norm=norm_spec(config, use_te=use_te))


def build_model_chunks(config, schedule: str, pp_rank: int, pp_size: int, pg_collection=None,
                       use_te: Optional[bool] = None) -> List[DeepSeekV3Model]:
    """This rank's two DeepSeekV3Model chunks for DualPipeV or DualPipe, in chunk order (the
    `model` list of megatron_dsv3.pipeline's forward_backward_dualpipe(v))."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: allowed values are 'dualpipev', 'dualpipe'")
    check_ranks(schedule, pp_size, ranks_name="pp_size")  # the schedule's rule: >= 1, DualPipe even
    if not isinstance(pp_rank, int) or isinstance(pp_rank, bool) or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank!r} is invalid: allowed values are integers in "
                         f"[0, {pp_size - 1}] (pp_size={pp_size})")
    if schedule == "dualpipe" and config.mtp_num_layers:
        raise ValueError("DualPipe with MTP is not supported (its four embedding copies would need "
                         "tying across both directions): allowed are schedule='dualpipev', which "
                         "DeepSeek-V3 uses and which keeps one embedding on rank 0, or "
                         "mtp_num_layers=None")
    placement = StageLayers.of(config, schedule, pp_size)
    lay = layout(schedule, pp_size)
    chunks = []
    for chunk in range(2):
        stage = lay.stage(pp_rank, chunk)
        first, last = stage == 0, stage == lay.stages - 1
        block = chunk_block_spec(config, placement.layers(pp_rank, chunk), use_te)
        chunks.append(DeepSeekV3Model(config, pre_process=first, post_process=last,
                                      mtp_process=last and bool(config.mtp_num_layers),
                                      vp_stage=chunk, pg_collection=pg_collection,
                                      transformer_layer_spec=block, use_te=use_te))
        _name_layers_by_position(chunks[-1].decoder)
    if schedule == "dualpipe":
        # every stage lives twice, as chunk 0 of rank s and chunk 1 of rank P-1-s, and both
        # copies hold the same (summed) gradients: Megatron's gradient norm and zero count
        # (param_is_not_shared, summed over the pipeline group) count each stage once, by its
        # chunk 0
        for p in chunks[1].parameters():
            p.shared = True
        # and in checkpoints the second copies are replicas of the first (megatron-core wants
        # exactly one main copy of every tensor: with two, no save or load passed its check)
        _as_replicas(chunks[1])
    if schedule == "dualpipev" and pp_rank == 0 and hasattr(chunks[1], "embedding"):
        # first and last stage on one rank: one embedding, used by both (MTP reads it)
        chunks[1].embedding.word_embeddings.weight = chunks[0].embedding.word_embeddings.weight
    return chunks


def _as_replicas(chunk) -> None:
    """`chunk.sharded_state_dict` with every sharded item a non-main replica (replica id first
    element 1): written by the main copy elsewhere, read all the same."""
    original = chunk.sharded_state_dict

    def mark(item):
        if isinstance(item, dict):
            return {k: mark(v) for k, v in item.items()}
        if isinstance(item, list):
            return [mark(v) for v in item]
        replica = getattr(item, "replica_id", None)
        if replica is not None:
            item.replica_id = (1, *replica[1:]) if isinstance(replica, tuple) else 1
        return item

    def sharded_state_dict(*args, **kwargs):
        return mark(original(*args, **kwargs))

    chunk.sharded_state_dict = sharded_state_dict


def _name_layers_by_position(block) -> None:
    """Megatron's TransformerBlock.sharded_state_dict gives each layer the checkpoint key of its
    global number (right for our chunks) but the local name `layers.{global - 1 - offset}` with
    the offset of Megatron's own contiguous split, which is not the layer's position in a
    V-placed chunk: load_state_dict would then miss every layer. Rename the local names to the
    positions (a chunk's layers are consecutive global numbers); the keys stay."""
    original = block.sharded_state_dict

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        state = original(prefix, sharded_offsets, metadata)
        head = f"{prefix}layers."
        named = {k: k[len(head):].split(".", 1) for k in state if k.startswith(head)}
        if not named:
            return state
        shift = min(int(index) for index, _ in named.values())
        return {(f"{head}{int(named[k][0]) - shift}.{named[k][1]}" if k in named else k): v
                for k, v in state.items()}

    block.sharded_state_dict = sharded_state_dict
