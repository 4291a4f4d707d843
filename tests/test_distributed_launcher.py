import pytest
import torch

from megatron_dsv3.testing.distributed import run_distributed


def _uneven_all_to_all(rank, world):
    import torch.distributed as dist

    # rank r sends (r + 1) rows to every peer
    send = torch.full(((rank + 1) * world,), float(rank))
    recv = torch.empty(sum(r + 1 for r in range(world)))
    dist.all_to_all_single(recv, send, output_split_sizes=[r + 1 for r in range(world)],
                           input_split_sizes=[rank + 1] * world)
    return recv.tolist()


def _fails(rank, world):
    if rank == 1:
        raise AssertionError("boom on rank 1")
    return rank


def test_launcher_returns_per_rank_results_of_uneven_all_to_all():
    out = run_distributed(_uneven_all_to_all, 3)
    for rank in range(3):
        assert out[rank] == [0.0] + [1.0] * 2 + [2.0] * 3


def test_launcher_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_distributed(_fails, 2)
