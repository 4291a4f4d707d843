"""Every difference between the megatron-core versions we support (0.16.1 to 0.19.x) lives here.

The rest of the package imports Megatron through these names only where the API moved; stable APIs
(ModuleSpec, build_module, parallel_state, tensor_parallel mappings) are imported directly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from typing import Optional

import torch
from packaging.version import Version

MCORE_VERSION = Version(importlib.metadata.version("megatron-core"))
MIN_MCORE, MAX_MCORE = Version("0.16.1"), Version("0.20")

if not (MIN_MCORE <= MCORE_VERSION < MAX_MCORE):  # pragma: no cover - install-time guard
    raise ImportError(
        f"megatron-dsv3 supports megatron-core >=0.16.1,<0.20; found {MCORE_VERSION}. "
        "Install a supported release: pip install 'megatron-core>=0.16.1,<0.20'"
    )

# From 0.18 Megatron's MultiTokenPredictionBlock expects each MTP layer to also return padding_mask.
MTP_LAYER_RETURNS_PADDING_MASK = MCORE_VERSION >= Version("0.18")

# From 0.19 the GPT builder calls a callable `--spec` attribute as spec(config[, vp_stage=...]).
SPEC_MAY_BE_CALLABLE = MCORE_VERSION >= Version("0.19")


@functools.lru_cache(maxsize=None)
def te_importable() -> bool:
    """True when Transformer Engine's PyTorch bindings import (they need CUDA libraries)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, OSError for missing CUDA libraries, ...
        return False
    return True


def use_transformer_engine() -> bool:
    """The one backend switch: Transformer Engine modules when TE imports and CUDA is present."""
    return te_importable() and torch.cuda.is_available()


def layer_offset(config, vp_stage: Optional[int] = None, pp_group=None) -> int:
    """Global index of the first decoder layer built on this pipeline stage (Megatron's rule)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from megatron.core.utils import get_pg_rank

    pp_rank = get_pg_rank(pp_group) if pp_group is not None else None
    return get_transformer_layer_offset(config, vp_stage, pp_rank)


def default_pg_collection():
    """Megatron's process groups from parallel_state (TP, PP, EP, CP, ...)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


class _CudaOnCpu:
    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """A view of torch in which CUDA devices map to the CPU (see `cuda_on_cpu`)."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "tensor", "full"):
            def on_cpu(*a, _attr=attr, **k):
                if str(k.get("device", "")).startswith("cuda"):
                    k["device"] = "cpu"
                return _attr(*a, **k)
            return on_cpu
        return attr


@contextlib.contextmanager
def cuda_on_cpu(*modules):
    """Run megatron-core code that hard-codes CUDA (device="cuda", torch.cuda.synchronize) on a
    machine without CUDA: the given modules see a torch whose CUDA devices are the CPU. A no-op
    when CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    saved = [m.torch for m in modules]
    for m in modules:
        m.torch = _TorchOnCpu()
    try:
        yield
    finally:
        for m, t in zip(modules, saved):
            m.torch = t
