"""Which layers each model chunk holds under DualPipeV / DualPipe, and the chunks themselves.

DualPipeV: P ranks, 2P stages; rank r holds stage r (chunk 0) and stage 2P-1-r (chunk 1), so rank
0 holds the first stage (embedding) and the last (final norm, output head and MTP) together.
DualPipe: P ranks, P stages held twice; rank r holds stage r (chunk 0, direction 0) and stage
P-1-r (chunk 1, direction 1). Decoder layers are split over the stages as evenly as possible, the
earlier stages taking the remainder (the last stage also runs the MTP layers).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Tuple

from megatron_dsv3.pipeline.schedules import layout


def stage_layer_ranges(num_layers: int, stages: int) -> List[Tuple[int, int]]:
    """[(first, last + 1)] global 1-based layer numbers per stage. With fewer layers than stages
    the last stages hold none (the last one still runs the final norm, the head and MTP)."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} is invalid: allowed values are >= 1")
    base, extra = divmod(num_layers, stages)
    out, start = [], 1
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append((start, start + n))
        start += n
    return out


@dataclasses.dataclass(frozen=True)
class StageLayers:
    """Placement read by DeepSeekV3TransformerLayer (config.dsv3_stage_layers): the global number
    of local layer `layer_number` (1-based) of chunk `vp_stage` on pipeline rank `pp_rank`."""

    schedule: str
    ranks: int
    num_layers: int

    def stage(self, pp_rank: int, chunk: int) -> int:
        return layout(self.schedule, self.ranks).stage(pp_rank, chunk)

    def layers(self, pp_rank: int, chunk: int) -> List[int]:
        lay = layout(self.schedule, self.ranks)
        first, end = stage_layer_ranges(self.num_layers, lay.stages)[self.stage(pp_rank, chunk)]
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
    placement = StageLayers(schedule, pp_size, config.num_layers)
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
    if schedule == "dualpipev" and pp_rank == 0 and hasattr(chunks[1], "embedding"):
        # first and last stage on one rank: one embedding, used by both (MTP reads it)
        chunks[1].embedding.word_embeddings.weight = chunks[0].embedding.word_embeddings.weight
    return chunks
