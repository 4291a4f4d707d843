"""Who sends which rows where: the pure index computation behind every stage of a dispatch.

Each stage of the node-aware dispatch answers the same question for a different kind of
destination. Rows (tokens, or token copies received from the previous stage) carry k slots; slot
j's destination is a node (stage one), a rank of this node (stage two) or a local expert (the rows
the grouped GEMM sees), or -1 when the slot is handled elsewhere. A row travels once to each
distinct destination of its slots, however many of its slots share that destination:

    copies = {(row, d) : d = dest[row, j] >= 0 for some j}, ordered by d, then by row.

No communication and no routing here: destinations come from the routing the MoE layer chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Copies:
    source: torch.Tensor  # [C] row each copy is made of
    destination: torch.Tensor  # [C] its destination, ascending
    slots: torch.Tensor  # [C, k] bool: which of the row's slots the copy serves
    counts: List[int]  # [D] copies per destination (the all-to-all send splits)


def copies_by_destination(dest: torch.Tensor, num_destinations: int) -> Copies:
    """dest [n, k] (int, -1 = none) -> one copy per (row, distinct destination)."""
    n, k = dest.shape
    dest = dest.long()
    reached = torch.zeros(n, num_destinations + 1, dtype=torch.bool, device=dest.device)
    reached.scatter_(1, dest + 1, True)  # column 0 collects the -1 slots
    destination, source = reached[:, 1:].t().nonzero(as_tuple=True)  # by destination, then row
    slots = dest.index_select(0, source) == destination[:, None]
    counts = torch.bincount(destination, minlength=num_destinations)
    return Copies(source, destination, slots, counts.tolist())
