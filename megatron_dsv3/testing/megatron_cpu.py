"""Run Megatron-LM and megatron-core code that hard-codes CUDA on CPU (gloo), for tests and
benchmarks only.

- `megatron_schedules_on_cpu()`: megatron-core's pipeline schedules and p2p_communication create
  tensors on "cuda" and call torch.cuda.synchronize; inside it those two modules see a torch whose
  CUDA devices are the CPU (megatron_dsv3.compat.cuda_on_cpu); nothing else in the process changes.
- `megatron_ddp_on_cpu()`: DistributedDataParallel allocates its gradient buffers on
  `torch.cuda.current_device()`; inside it its buffer module (param_and_grad_buffer) sees the CPU
  as that device. Gradient hooks, reduction and `finish_grad_sync` run on gloo unchanged.
- `megatron_lm_on_cpu()`: Megatron-LM's own, unmodified `pretrain()` (megatron.training, the
  top-level pretrain_gpt.py) on a machine without CUDA, with `--distributed-backend gloo`. Every
  CUDA call site on pretrain()'s path is redirected here and only here (see its docstring); the
  model, data, optimizer, checkpointing and logging code run as they are.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Dict, List, Tuple

import torch

from megatron_dsv3.compat import _TorchOnCpu, cuda_on_cpu


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


# -- Megatron-LM's pretrain() on CPU -------------------------------------------------------------

class _NoStream:
    """torch.cuda.Stream / current_stream() on a machine whose only device is the CPU."""

    def __init__(self, *_a, **_k):
        pass

    def wait_stream(self, *_a, **_k):
        return None

    def synchronize(self):
        return None


class _CpuAsCuda:
    """torch.cuda as Megatron-LM's training code sees it inside `megatron_lm_on_cpu()`: one
    device, the CPU. Synchronisation, caches, streams and memory statistics are no-ops or zeros;
    the CUDA generator state is a stand-in (the CPU generator is saved and restored by Megatron
    itself); anything else is torch.cuda's own."""

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def current_device():
        return "cpu"

    Stream = _NoStream

    @staticmethod
    def current_stream(*_a, **_k):
        return _NoStream()

    @staticmethod
    def stream(*_a, **_k):
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(*_a, **_k):
        return torch.zeros(0, dtype=torch.uint8)

    @staticmethod
    def memory_stats(*_a, **_k):
        return {}

    def __getattr__(self, name):
        if name in ("synchronize", "set_device", "empty_cache", "set_rng_state", "manual_seed",
                    "manual_seed_all", "reset_peak_memory_stats", "reset_max_memory_allocated"):
            return lambda *_a, **_k: None
        if name.startswith(("memory_", "max_memory_")) or name == "device_memory_used":
            return lambda *_a, **_k: 0
        return getattr(torch.cuda, name)


class _TorchWithCpuAsCuda(_TorchOnCpu):
    """torch for one Megatron-LM module: device="cuda" means the CPU (see _CpuAsCuda)."""

    cuda = _CpuAsCuda()
    factories = _TorchOnCpu.factories + ("arange", "rand", "randn")


class _CpuRNGStatesTracker:
    """Megatron's CUDA RNG tracker (named generator states forked around model-parallel
    randomness) kept on the CPU generator: the same interface (add, fork, get_states,
    set_states, reset), so dropout inside `get_cuda_rng_tracker().fork()` and Megatron's RNG
    checkpointing work."""

    def __init__(self, *_a, **_k):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _cpu_model_parallel_manual_seed(seed, *_a, **_k):
    """model_parallel_cuda_manual_seed's seeds (Megatron's offsets per TP / EP rank) on the CPU
    generator, in _CpuRNGStatesTracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random

    tracker = _CpuRNGStatesTracker()
    random._CUDA_RNG_STATE_TRACKER = tracker
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


class _Proxy(types.SimpleNamespace):
    """A module as one Megatron-LM module sees it: `overrides`, else the module's own names."""

    def __init__(self, module, **overrides):
        super().__init__(**overrides)
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


# Megatron-LM / megatron-core modules on pretrain()'s path that call torch.cuda or create tensors
# on "cuda" through their module-level `torch` (present ones only: the list spans 0.16 .. 0.19)
_CUDA_MODULES = (
    "megatron.training.training", "megatron.training.initialize", "megatron.training.utils",
    "megatron.training.checkpointing", "megatron.training.inprocess_restart",
    "megatron.training.theoretical_memory_usage", "megatron.training.global_vars",
    "megatron.training.models.dist_utils", "megatron.training.utils.common_utils",
    "megatron.training.utils.utils",
    "megatron.core.timers", "megatron.core.rerun_state_machine",
    "megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.transformer.moe.moe_utils", "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads", "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.optimizer_config",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)


def _set(saved: List[Tuple[object, str, object]], obj, name: str, value) -> None:
    saved.append((obj, name, obj.__dict__.get(name, _MISSING) if isinstance(obj, type)
                  else getattr(obj, name, _MISSING)))
    setattr(obj, name, value)


_MISSING = object()


def _compiled_helpers_or(compile_helpers):
    """initialize's `compile_helpers` (runs `make` in megatron/core/datasets): skipped when the
    compiled helpers already import (a pip-installed megatron-core ships them, without the
    Makefile)."""
    def maybe_compile():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            compile_helpers()
    return maybe_compile


def _type_names_cpu_as_cuda(original):
    """`Tensor.type()` (no arguments) naming a CPU tensor as its CUDA twin ("torch.FloatTensor"
    -> "torch.cuda.FloatTensor"): Megatron's optimizers and clip_grads assert that name;
    conversions (`.type(dtype)`) are torch's own."""
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)
    return type_


@contextlib.contextmanager
def megatron_lm_on_cpu():
    """Megatron-LM's unmodified `pretrain()` on CPU/gloo (pass `--distributed-backend gloo`).

    What is redirected, in the order pretrain() meets it (core_v0.16.1 .. core_v0.19.x):
    - `initialize_megatron` asserts CUDA: called with `allow_no_cuda=True`;
    - `_initialize_distributed` skips model-parallel init when `torch.cuda.device_count() == 0`,
      and timers, checkpointing, the rerun state machine, schedules, DDP buffers, optimizers and
      the training loop create tensors on "cuda" and call torch.cuda.synchronize /
      current_device / memory statistics / streams: these modules (`_CUDA_MODULES`) see a torch
      whose single CUDA device is the CPU (`_TorchWithCpuAsCuda`);
    - `model_parallel_cuda_manual_seed` (CUDA RNG tracker): Megatron's seeds on the CPU generator
      (`_CpuRNGStatesTracker`, so `get_cuda_rng_tracker().fork()` and RNG checkpointing work);
    - fused-kernel loading (runs nvcc) and `_warmup_jit_function` (device="cuda"): skipped;
      the dataset helpers' `make` too when they are already compiled (pip-installed
      megatron-core ships them without the Makefile: not a CUDA site, but on the same path);
    - `Tensor.cuda()` / `Module.cuda()` (get_model's `model_module.cuda(...)`, get_batch's
      `data[...].cuda(non_blocking=True)`): identity, the data and the model stay on the CPU;
    - `Tensor.type()` names a CPU tensor as its CUDA twin (optimizer and clip_grads asserts).
    Everything is restored on exit. A no-op when CUDA is available.
    """
    if torch.cuda.is_available():
        yield
        return
    saved: List[Tuple[object, str, object]] = []
    view = _TorchWithCpuAsCuda()
    try:
        for name in _CUDA_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "torch"):
                _set(saved, module, "torch", view)
        from megatron.training import initialize, training

        original_init = initialize.initialize_megatron

        def initialize_megatron(*a, **k):
            k["allow_no_cuda"] = True
            return original_init(*a, **k)

        _set(saved, training, "initialize_megatron", initialize_megatron)
        _set(saved, initialize, "initialize_megatron", initialize_megatron)
        _set(saved, initialize, "tensor_parallel", _Proxy(
            initialize.tensor_parallel,
            model_parallel_cuda_manual_seed=_cpu_model_parallel_manual_seed))
        if hasattr(initialize, "fused_kernels"):
            _set(saved, initialize, "fused_kernels",
                 _Proxy(initialize.fused_kernels, load=lambda *_a, **_k: None))
        _set(saved, initialize, "_warmup_jit_function", lambda *_a, **_k: None)
        from megatron.core.datasets import utils as dataset_utils

        _set(saved, dataset_utils, "compile_helpers",
             _compiled_helpers_or(dataset_utils.compile_helpers))
        _set(saved, torch.Tensor, "cuda", lambda self, *_a, **_k: self)
        _set(saved, torch.Tensor, "type", _type_names_cpu_as_cuda(torch.Tensor.type))
        _set(saved, torch.nn.Module, "cuda", lambda self, *_a, **_k: self)
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
