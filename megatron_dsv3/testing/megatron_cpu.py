"""Run stock megatron-core pipeline schedules on CPU (gloo), for tests and benchmarks only.

megatron-core's schedules and p2p_communication create tensors on "cuda" and call
torch.cuda.synchronize; inside `megatron_schedules_on_cpu()` those two modules see a torch whose
CUDA devices are the CPU (megatron_dsv3.compat.cuda_on_cpu); nothing else in the process changes.
"""

from __future__ import annotations

import contextlib

from megatron_dsv3.compat import cuda_on_cpu


@contextlib.contextmanager
def megatron_schedules_on_cpu():
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    with cuda_on_cpu(schedules, p2p_communication):
        yield
