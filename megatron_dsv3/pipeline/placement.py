"""Which layers each model chunk holds under DualPipeV / DualPipe, and the chunks themselves.

DualPipeV: P ranks, 2P stages; rank r holds stage r (chunk 0) and stage 2P-1-r (chunk 1), so rank
0 holds the first stage (embedding) and the last (final norm, output head and MTP) together.
DualPipe: P ranks, P stages held twice; rank r holds stage r (chunk 0, direction 0) and stage
P-1-r (chunk 1, direction 1). Decoder layers are split over the stages as evenly as possible, the
earlier stages taking the remainder (the last stage also runs the MTP layers), or, when the config
sets Megatron's num_layers_in_first/last_pipeline_stage, as those say (megatron_dsv3.configs.layout:
the count of the first and the last pipeline rank, the other ranks splitting the rest evenly; under
DualPipeV a rank's count is shared by its two stages, the earlier taking the odd layer).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Tuple

from megatron_dsv3.configs import layout as layout_rules
from megatron_dsv3.pipeline.schedules import layout


def stage_layer_ranges(num_layers: int, stages: int, first: Optional[int] = None,
                       last: Optional[int] = None,
                       schedule: str = "dualpipev") -> List[Tuple[int, int]]:
    """[(first, last + 1)] global 1-based layer numbers per stage of `schedule` ('dualpipev':
    stages = 2 x ranks; 'dualpipe': stages = ranks). Without first/last the split is as even as
    possible, the earlier stages taking the remainder; with fewer layers than stages the last
    stage holds none (it still runs the final norm, the head and MTP)."""
    ranks = stages // 2 if schedule == "dualpipev" else stages
    if schedule == "dualpipev" and stages % 2:
        raise ValueError(f"stages={stages} is invalid under dualpipev: allowed values are even")
    return layout_rules.stage_layer_ranges(num_layers, schedule, ranks, first, last)


@dataclasses.dataclass(frozen=True)
class StageLayers:
    """Placement read by DeepSeekV3TransformerLayer (config.dsv3_stage_layers): the global number
    of local layer `layer_number` (1-based) of chunk `vp_stage` on pipeline rank `pp_rank`."""

    schedule: str
    ranks: int
    num_layers: int
    first: Optional[int] = None  # Megatron's num_layers_in_first_pipeline_stage (pp rank 0)
    last: Optional[int] = None  # Megatron's num_layers_in_last_pipeline_stage (pp rank P-1)

    def __post_init__(self):
        self.ranges()  # refuse a split that does not divide, naming the field

    @classmethod
    def of(cls, config, schedule: str, ranks: int) -> "StageLayers":
        """The placement the config asks for (its num_layers and first/last fields)."""
        return cls(schedule, ranks, config.num_layers, **layout_rules.stage_split_of(config))

    def ranges(self) -> List[Tuple[int, int]]:
        return layout_rules.stage_layer_ranges(self.num_layers, self.schedule, self.ranks,
                                               self.first, self.last)

    def stage(self, pp_rank: int, chunk: int) -> int:
        return layout(self.schedule, self.ranks).stage(pp_rank, chunk)

    def layers(self, pp_rank: int, chunk: int) -> List[int]:
        first, end = self.ranges()[self.stage(pp_rank, chunk)]
        return list(range(first, end))

    def global_layer_number(self, layer_number: int, vp_stage, pg_collection) -> int:
        pp = getattr(pg_collection, "pp", None)
        rank = pp.rank() if pp is not None else 0
        return self.layers(rank, vp_stage or 0)[layer_number - 1]

    def table(self) -> Dict[int, List[List[int]]]:
        return {r: [self.layers(r, c) for c in range(2)] for r in range(self.ranks)}


def build_chunks(config, schedule: str, pp_rank: int, pp_size: int, pg_collection=None,
                 use_te: Optional[bool] = None):
    """This rank's two DeepSeekV3Model chunks for DualPipeV or DualPipe (in chunk order)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_dsv3.layer_specs import backend, get_layer_spec
    from megatron_dsv3.model import DeepSeekV3Model

    if schedule not in ("dualpipev", "dualpipe"):
        raise ValueError(f"schedule={schedule!r}: allowed values are 'dualpipev', 'dualpipe'")
    if schedule == "dualpipe" and config.mtp_num_layers:
        raise ValueError("DualPipe with MTP is not supported (its four embedding copies would need "
                         "tying across both directions): allowed are schedule='dualpipev', which "
                         "DeepSeek-V3 uses and which keeps one embedding on rank 0, or "
                         "mtp_num_layers=None")
    placement = StageLayers.of(config, schedule, pp_size)
    config = copy.copy(config)
    object.__setattr__(config, "dsv3_stage_layers", placement)
    lay = layout(schedule, pp_size)
    spec = get_layer_spec(config, use_te=use_te)
    chunks = []
    for chunk in range(2):
        stage = lay.stage(pp_rank, chunk)
        n = len(placement.layers(pp_rank, chunk))
        first, last = stage == 0, stage == lay.stages - 1
        block = TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=backend(use_te).norm)
        chunks.append(DeepSeekV3Model(config, pre_process=first, post_process=last,
                                      mtp_process=last and bool(config.mtp_num_layers),
                                      vp_stage=chunk, pg_collection=pg_collection,
                                      transformer_layer_spec=block, use_te=use_te))
        _name_layers_by_position(chunks[-1].decoder)
    if schedule == "dualpipev" and pp_rank == 0 and hasattr(chunks[1], "embedding"):
        # first and last stage on one rank: one embedding, used by both (MTP reads it)
        chunks[1].embedding.word_embeddings.weight = chunks[0].embedding.word_embeddings.weight
    return chunks


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
