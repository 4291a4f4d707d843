"""Run stock megatron-core pipeline schedules on CPU (gloo), for tests and benchmarks only.

megatron-core's schedules and p2p_communication create tensors on "cuda" and call
torch.cuda.synchronize. `megatron_schedules_on_cpu()` swaps the `torch` those two modules see for
a view of torch in which CUDA devices map to the CPU; nothing else in the process changes.
"""

from __future__ import annotations

import contextlib
import types

import torch


class _CudaOnCpu:
    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _device(kwargs):
    dev = kwargs.get("device")
    if dev is not None and str(dev).startswith("cuda"):
        kwargs["device"] = "cpu"
    return kwargs


class _TorchOnCpu(types.ModuleType):
    def __init__(self):
        super().__init__("torch_on_cpu")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "tensor", "full"):
            return lambda *a, **k: attr(*a, **_device(k))
        return attr


@contextlib.contextmanager
def megatron_schedules_on_cpu():
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    saved = (schedules.torch, p2p_communication.torch)
    schedules.torch = p2p_communication.torch = _TorchOnCpu()
    try:
        yield
    finally:
        schedules.torch, p2p_communication.torch = saved
