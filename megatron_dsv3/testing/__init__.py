"""Test utilities that ship with the package: a multi-process gloo launcher for distributed tests
and benchmarks (several simulated nodes on one machine)."""

import importlib

# imported on first use
_LAZY = {"run_distributed": "distributed", "megatron_schedules_on_cpu": "megatron_cpu",
         "megatron_ddp_on_cpu": "megatron_cpu"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
