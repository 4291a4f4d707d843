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


@pytest.fixture(autouse=True)
def _megatron_loss_scales():
    """Megatron keeps the backward scale of auxiliary losses (MoE, MTP) on the class, shared by
    every test in the process: restore it after each test so no test sees another's scale."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    saved = {}
    for cls in (MoEAuxLossAutoScaler, MTPLossAutoScaler):
        value = cls.__dict__.get("main_loss_backward_scale", None)
        # set_loss_scale may copy into the existing tensor: keep a copy, not the object
        saved[cls] = value.clone() if isinstance(value, torch.Tensor) else value
    yield
    for cls, value in saved.items():
        cls.main_loss_backward_scale = value
