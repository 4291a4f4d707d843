"""Run stock megatron-core pipeline schedules and DistributedDataParallel on CPU (gloo), for tests
and benchmarks only.

megatron-core's schedules and p2p_communication create tensors on "cuda" and call
torch.cuda.synchronize; inside `megatron_schedules_on_cpu()` those two modules see a torch whose
CUDA devices are the CPU (megatron_dsv3.compat.cuda_on_cpu); nothing else in the process changes.
DistributedDataParallel allocates its gradient buffers on `torch.cuda.current_device()`; inside
`megatron_ddp_on_cpu()` its buffer module (param_and_grad_buffer) sees the CPU as that device.
Gradient hooks, reduction and `finish_grad_sync` run on gloo unchanged.
"""

from __future__ import annotations

import contextlib

from megatron_dsv3.compat import cuda_on_cpu


@contextlib.contextmanager
def megatron_schedules_on_cpu():
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    with cuda_on_cpu(schedules, p2p_communication):
        yield


@contextlib.contextmanager
def megatron_ddp_on_cpu():
    """Wrap models in megatron.core's DistributedDataParallel inside this block (its parameter
    and gradient buffers land on the CPU)."""
    from megatron.core.distributed import param_and_grad_buffer

    with cuda_on_cpu(param_and_grad_buffer):
        yield
