"""Setting up the process world: torch.distributed and Megatron's parallel_state.

`init_distributed` joins torchrun's world (a one-rank gloo world without a launcher);
`init_single_process` makes a one-rank world on a free local port, which is what building our
modules needs outside a launcher (library use, generation, the planner, benchmarks). Both give
every process group a finite collective timeout (megatron_dsv3.liveness).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def default_backend() -> str:
    """The torch.distributed backend of a torchrun world: NCCL where CUDA is available."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, timeout_minutes: float = 10.0,
                     megatron: bool = True):
    """torch.distributed from torchrun's environment (a one-rank gloo world without it) and
    Megatron's parallel_state with the given sizes, if not set up yet. Collectives time out after
    `timeout_minutes` (0: torch's default); Megatron's groups get the default group's timeout
    (dist.new_group would give them torch's default, not the default group's). With
    megatron=False only the world (a second call sets up parallel_state: its group creation
    involves every rank, and a caller may watch it, e.g. the trainer's start-up watchdog)."""
    from megatron_dsv3.liveness import collective_timeout

    timeout = collective_timeout(timeout_minutes)
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=int(os.environ.get("RANK", "0")), world_size=world,
                                timeout=timeout)
    if not megatron:
        return
    _init_megatron(timeout, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   expert_model_parallel_size=ep)


def _init_megatron(timeout, **sizes) -> None:
    """parallel_state.initialize_model_parallel (if not done yet) with every group on the default
    group's timeout (or `timeout`): Megatron's argument covers its groups but one (0.16.1 makes
    EXPERT_DATA_PARALLEL_GROUP_GLOO without it), which gets it afterwards."""
    from megatron_dsv3.liveness import align_group_timeouts, group_timeout

    if parallel_state.model_parallel_is_initialized():
        have = {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size":
                    parallel_state.get_pipeline_model_parallel_world_size(),
                "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size()}
        differ = [f"{k}={have[k]} (asked: {v})" for k, v in sizes.items()
                  if v is not None and have[k] != v]
        if differ:
            raise ValueError("Megatron's parallel_state is already initialised with "
                             + ", ".join(differ) + ": the run would go on in that layout. "
                             "Allowed: the same sizes, or parallel_state.destroy_model_parallel() "
                             "first")
        return
    timeout = group_timeout() or timeout
    if timeout:
        sizes["distributed_timeout_minutes"] = timeout.total_seconds() / 60
    parallel_state.initialize_model_parallel(**sizes)
    align_group_timeouts(getattr(parallel_state, "_global_process_group_list", None) or [])


def init_single_process(timeout_minutes: float = 10.0) -> None:
    """A one-rank gloo world on a free local port and Megatron's parallel_state with all sizes 1
    (what building our modules needs outside a launcher), if not set up yet; collectives time out
    after `timeout_minutes` (0: torch's default)."""
    import socket

    from megatron_dsv3.liveness import collective_timeout

    timeout = collective_timeout(timeout_minutes)
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, timeout=timeout)
    _init_megatron(timeout)
