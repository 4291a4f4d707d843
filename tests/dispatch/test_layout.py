"""copies_by_destination: one copy per (row, distinct destination), ordered by destination then row,
with exactly the slots that destination serves — checked against a naive loop."""

import torch

from megatron_dsv3.dispatch.layout import copies_by_destination


def _naive(dest, num_destinations):
    copies = []
    for d in range(num_destinations):
        for row in range(dest.shape[0]):
            slots = [int(v) == d for v in dest[row]]
            if any(slots):
                copies.append((row, d, slots))
    return copies


def test_copies_by_destination_equal_naive_loop_with_shared_and_empty_destinations():
    g = torch.Generator().manual_seed(0)
    for n, k, D in ((0, 3, 4), (1, 1, 1), (7, 4, 3), (40, 8, 5)):
        # repeated destinations within a row, and -1 (handled elsewhere) slots
        dest = torch.randint(-1, D, (n, k), generator=g)
        got = copies_by_destination(dest, D)
        want = _naive(dest, D)
        assert got.source.tolist() == [r for r, _, _ in want]
        assert got.destination.tolist() == [d for _, d, _ in want]
        assert got.slots.tolist() == [s for _, _, s in want]
        assert got.counts == [sum(1 for _, d, _ in want if d == j) for j in range(D)]


def test_distinct_destinations_give_one_copy_per_slot():
    # a token's experts are distinct, so expanding copies by local expert yields one row per slot
    dest = torch.tensor([[2, 0, -1], [1, 2, 0], [-1, -1, -1]])
    got = copies_by_destination(dest, 3)
    assert got.slots.sum(1).tolist() == [1] * 5
    assert got.counts == [2, 1, 2]
