"""Which layers each model chunk holds under DualPipeV / DualPipe (pure placement math; the chunks
are built from it by megatron_dsv3.model_chunks).

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
    """The global 1-based layer numbers each chunk of each pipeline rank holds under `schedule`
    ('dualpipev' or 'dualpipe'), with `num_layers` decoder layers over `ranks` pipeline ranks."""

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
        """Global numbers of the layers of chunk `chunk` on pipeline rank `pp_rank`, in order."""
        first, end = self.ranges()[self.stage(pp_rank, chunk)]
        return list(range(first, end))

    def table(self) -> Dict[int, List[List[int]]]:
        return {r: [self.layers(r, c) for c in range(2)] for r in range(self.ranks)}
