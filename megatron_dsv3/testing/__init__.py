"""Test utilities that ship with the package: a multi-process gloo launcher for distributed tests
and benchmarks (several simulated nodes on one machine)."""

from megatron_dsv3.lazy import lazy_attributes

# imported on first use
_LAZY = {"run_distributed": "distributed", "megatron_schedules_on_cpu": "megatron_cpu",
         "megatron_ddp_on_cpu": "megatron_cpu"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
