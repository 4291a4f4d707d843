"""Every difference between the megatron-core versions we support (0.16.1 to 0.19.x) lives here.

The rest of the package imports Megatron through these names only where the API moved; stable APIs
(ModuleSpec, build_module, parallel_state, tensor_parallel mappings) are imported directly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import warnings
from typing import Optional

import torch
from packaging.version import Version

MIN_MCORE, MAX_MCORE = Version("0.16.1"), Version("0.20")


def _imported_megatron_core_version() -> Version:
    """The version of the megatron.core that Python imports. That is not always the installed
    distribution's: a script run from a Megatron-LM checkout (pretrain_gpt.py) imports the
    checkout's own megatron/core first, whatever `pip` installed."""
    try:
        from megatron.core.package_info import __version__
    except ImportError:  # pragma: no cover - megatron.core without package_info
        __version__ = importlib.metadata.version("megatron-core")
    return Version(__version__)


MCORE_VERSION = _imported_megatron_core_version()


ALLOW_UNTESTED_ENV = "MEGATRON_DSV3_ALLOW_UNTESTED_MCORE"


def _unsupported_version_message(version: Version) -> str:
    import megatron.core

    where = megatron.core.__file__.rsplit("/", 1)[0]
    message = ("megatron-dsv3 supports megatron-core 0.16.1 to 0.19.x (CI tests 0.16.1 and "
               f"0.19.x); Python imports megatron-core {version} from {where}. ")
    newer = Version(version.base_version) >= MAX_MCORE
    if newer:
        message += (f"megatron-core {version.base_version} (Megatron-LM main, or a release newer "
                    "than this megatron-dsv3) is not supported yet: it is not tested here. ")
    message += (
        "To fix: (1) install a supported release, pip install 'megatron-core==0.19.*' (or "
        "'megatron-core==0.16.1'); (2) to run Megatron-LM's own training scripts, use a release "
        "checkout whose megatron/core is that version, git -C <Megatron-LM> checkout core_v0.19.0 "
        "(tags core_v0.16.1 to core_v0.19.x), since a script run from a checkout imports the "
        "checkout's megatron/core, not the pip package")
    if newer:
        message += (f"; (3) to try this newer megatron-core at your own risk, set "
                    f"{ALLOW_UNTESTED_ENV}=1: a warning replaces this error and every version "
                    "switch in megatron_dsv3.compat takes 0.19's side")
    return message + "."


def check_supported(version: Version) -> None:
    """ImportError, saying what to do, unless `version` is in [MIN_MCORE, MAX_MCORE); pre-releases
    and git builds of MAX_MCORE (0.20.0rc0, Megatron-LM main's 0.20.0+<commit>) count as
    MAX_MCORE. Versions from MAX_MCORE on only warn when the environment sets
    MEGATRON_DSV3_ALLOW_UNTESTED_MCORE=1."""
    if version >= MIN_MCORE and Version(version.base_version) < MAX_MCORE:
        return
    if Version(version.base_version) >= MAX_MCORE and os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(f"megatron-core {version} is newer than the versions megatron-dsv3 is "
                      f"tested with (0.16.1 to 0.19.x); running anyway because "
                      f"{ALLOW_UNTESTED_ENV}=1", stacklevel=2)
        return
    raise ImportError(_unsupported_version_message(version))


check_supported(MCORE_VERSION)

# From 0.17 GPTModel decides `mtp_process` itself (mtp_on_this_rank: MTP on the last pipeline
# rank's last virtual stage) instead of taking it from the spec (0.16: MTP wherever an MTP spec is
# given). DualPipe(V) puts the last stage on pipeline rank 0 (its second chunk): 0.17+ would build
# no MTP block anywhere, train without MTP and, with DualPipeV's rank 0 left without MoE layers,
# deadlock the trainer. DeepSeekV3Model.mtp_process keeps the caller's placement on every version
# (on 0.16 that is what Megatron's own rule gives), so no switch is needed. Megatron's vp_stage
# is also no DualPipe chunk index: see `megatron_vp_stage`.

# From 0.17 Megatron reaches the transformer layer inside an MTP layer as `mtp_model_layer`
# (0.16: `transformer_layer`; set_current_microbatch, which every schedule calls, asserts it).
# Our MTPLayer keeps `transformer_layer` (its checkpoint keys, which 0.19 maps its own name back
# to) and answers to both names on every version, so no switch is needed.

# From 0.18 Megatron's MultiTokenPredictionBlock expects each MTP layer to also return padding_mask
# (and GPTModel hands padding_mask to _postprocess and the MTP block; before, to the decoder only).
MTP_LAYER_RETURNS_PADDING_MASK = MCORE_VERSION >= Version("0.18")

# From 0.18 Megatron's MTP loss under calculate_per_token_loss scales each depth's summed loss by
# (the micro-batch's tokens / the depth's tokens): finalize_model_grads divides every gradient by
# the main loss's token count, and this keeps an MTP token's weight the same as in the mean form
# (0.16 - 0.17: the plain sum, an MTP depth weighed T_k / T of that).
MTP_PER_TOKEN_LOSS_RESCALED = MCORE_VERSION >= Version("0.18")

# Megatron-LM's training code (pretrain_gpt.py's helpers), which our entry point answers per model
# chunk: whether this rank runs an MTP block is `mtp_on_this_rank` in 0.16 - 0.18 and
# `mtp_on_this_rank_func` from 0.19 (pretrain_gpt.py imports whichever its version has).
MTP_ON_THIS_RANK_NAMES = ("mtp_on_this_rank", "mtp_on_this_rank_func")


def pretrain_takes_config_container(pretrain) -> bool:
    """Megatron-LM 0.19+: its script parses the arguments itself and hands `pretrain` a config
    container (`cfg_container`); 0.16 - 0.18's `pretrain` parses them (extra_args_provider)."""
    import inspect

    return "cfg_container" in inspect.signature(pretrain).parameters


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


def megatron_vp_stage(config, chunk: Optional[int]) -> Optional[int]:
    """The `vp_stage` to hand Megatron for a model chunk. Megatron's vp_stage is a stage of its
    interleaved schedule and exists only with config.virtual_pipeline_model_parallel_size > 1
    (its is_vp_first_stage / is_vp_last_stage assert vp_stage in (None, 0) otherwise; from 0.17
    MultiTokenPredictionBlock checks it on construction). A DualPipe(V) chunk index (0 or 1) is
    not one: without a virtual pipeline it becomes None."""
    vp_size = getattr(config, "virtual_pipeline_model_parallel_size", None)
    return chunk if vp_size is not None and vp_size > 1 else None


def default_pg_collection():
    """Megatron's process groups from parallel_state (TP, PP, EP, CP, ...)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


class _CpuStream:
    """The stream of a CPU "device": work is done when the call returns, so waits are no-ops."""

    def wait_event(self, *_a, **_k):
        return None

    def wait_stream(self, *_a, **_k):
        return None

    def synchronize(self):
        return None


class _CudaOnCpu:
    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    @staticmethod
    def current_stream(*_a, **_k):
        # from 0.19 DDP's start_grad_sync waits on the current stream for CUDA-graph gradients
        return _CpuStream()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """A view of torch in which CUDA devices map to the CPU (see `cuda_on_cpu`)."""

    cuda = _CudaOnCpu()
    factories = ("zeros", "ones", "empty", "tensor", "full")  # whose device="cuda" means CPU

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self.factories:
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


def save_mtp_loss_to_megatron_tracker(loss, layer_number: int, num_layers: int,
                                      reduce_group=None, avg_group=None) -> None:
    """Megatron-LM's MTP log line ("mtp_{k} loss", written by its training_log through
    MTPLossLoggingHelper.track_mtp_metrics): add depth `layer_number`'s loss to Megatron's
    tracker. 0.16-0.18: `save_loss_to_tracker(loss, layer, num_layers, reduce_group, avg_group)`;
    0.19+: `save_metrics_to_tracker(loss, correct, total, ...)` (the acceptance-rate counts, which
    only reach TensorBoard/W&B, are left at zero)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    if hasattr(MTPLossLoggingHelper, "save_metrics_to_tracker"):
        zero = loss.new_zeros(())
        MTPLossLoggingHelper.save_metrics_to_tracker(loss, zero, zero, layer_number, num_layers,
                                                     reduce_group=reduce_group,
                                                     avg_group=avg_group)
    else:
        MTPLossLoggingHelper.save_loss_to_tracker(loss, layer_number, num_layers,
                                                  reduce_group=reduce_group, avg_group=avg_group)
