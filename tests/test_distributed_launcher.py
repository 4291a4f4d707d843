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


def _environment_and_path(rank, world, name):
    import os
    import sys

    return os.environ.get(name), sys.path[0]


@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_ranks_see_the_callers_environment_and_import_path_at_the_call(monkeypatch, tmp_path,
                                                                       start):
    """Ranks forked from the (long-lived) fork server still get what the caller has at the call:
    a variable set after the server started, and an import path entry added after it."""
    monkeypatch.setenv("MEGATRON_DSV3_MP_START", start)
    run_distributed(_uneven_all_to_all, 2)  # the fork server (if any) is up before the changes
    monkeypatch.setenv("DSV3_LAUNCHER_PROBE", "set-after-start")
    monkeypatch.syspath_prepend(str(tmp_path))
    results = run_distributed(_environment_and_path, 2, args=("DSV3_LAUNCHER_PROBE",))
    assert results == [("set-after-start", str(tmp_path))] * 2


def test_unknown_start_method_is_refused_with_the_allowed_values(monkeypatch):
    monkeypatch.setenv("MEGATRON_DSV3_MP_START", "fork")
    with pytest.raises(ValueError, match="MEGATRON_DSV3_MP_START='fork': allowed values are "
                                         "forkserver, spawn"):
        run_distributed(_uneven_all_to_all, 2)
