"""Shared fixtures: a one-process gloo world with Megatron's parallel_state initialised."""

import os
import socket

import pytest
import torch

import megatron_dsv3  # noqa: F401  (silences megatron-core's TE/apex import notices first)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank_world():
    """torch.distributed (gloo, world size 1) and Megatron parallel_state with all sizes 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    yield
    

@pytest.fixture
def tiny_config():
    from megatron_dsv3.configs import get_config

    return get_config("deepseek-v3-tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
