"""Which GEMM backend runs our GEMMs here, and why: the probe and the decision, kept apart from the
binding so that the decision can be tested on any machine by handing it capabilities.

Backends (`dsv3_gemm_backend` on the config; None = auto):

- 'emulated': our GEMMs in torch: plain GEMMs in the compute dtype, and for the FP8 recipe
  `fp8.gemm.Fp8BlockwiseGemm` (quantise, dequantise, float32 GEMM). Runs everywhere.
- 'torch': the FP8 recipe on torch's own blockwise-scaled GEMMs (`fp8.torch_gemm`:
  F.scaled_mm with BlockWise1x128 / BlockWise128x128 scales, routed experts one
  F.scaled_mm per expert); BF16 experts through torch._grouped_mm. Needs CUDA on SM 9.x
  (torch's DeepSeek-style scaling checks `major == 9` and refuses other GPUs, SM100 included),
  CUDA >= 12.9 (cuBLASLt's 1x128 / 128x128 scale modes) and torch >= 2.10 with F.scaled_mm and
  ScalingType.BlockWise1x128 / BlockWise128x128.
- 'te': Transformer Engine modules (linears, norms, core attention, routed experts through TE's
  GroupedLinear) with the FP8 recipe as TE's Float8BlockScaling under `te.pytorch.autocast`
  (`fp8.te_autocast`). Needs TE importable and CUDA.

Auto picks 'te' where TE imports and CUDA is present (the same test as the module backend,
`compat.use_transformer_engine`), else 'torch' where it can run, else 'emulated'. A backend that
was asked for and cannot run here is refused with a ValueError naming `dsv3_gemm_backend`, the
reason and the backends that can run. `resolve(config)` makes the choice for a config and logs it
once per process (backend and reason).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Dict, Optional, Tuple

import torch

from megatron_dsv3.upstream_flags import fp8_on

# dsv3_gemm_backend's values (configs.config.GEMM_BACKENDS, which validates the field; the
# configs do not import fp8, and this module stays free of megatron-core so that
# bench/gpu_check.py can report the choice without it: tests/fp8/test_backends.py keeps the two
# equal)
GEMM_BACKENDS = ("emulated", "torch", "te")

log = logging.getLogger(__name__)

MIN_TORCH = (2, 10)  # F.scaled_mm with ScalingType (the blockwise API)
MIN_CUDA = (12, 9)  # cuBLASLt's VEC128 / BLK128x128 scale modes
HOPPER = 9  # torch's DeepSeek-style scaling: `major == 9` only


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this process can run. `probe()` fills it in; tests construct it by hand."""

    cuda: bool = False
    device_name: Optional[str] = None
    capability: Optional[Tuple[int, int]] = None  # (major, minor) of the current CUDA device
    cuda_version: Optional[Tuple[int, int]] = None  # torch.version.cuda
    torch_version: Tuple[int, int] = (0, 0)
    blockwise_scaled_mm: bool = False  # F.scaled_mm and ScalingType.BlockWise1x128/128x128 exist
    te: bool = False  # transformer_engine.pytorch imports
    te_version: Optional[str] = None


def _version_tuple(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _blockwise_api() -> bool:
    import torch.nn.functional as F

    scaling = getattr(F, "ScalingType", None)
    return (hasattr(F, "scaled_mm") and scaling is not None
            and hasattr(scaling, "BlockWise1x128") and hasattr(scaling, "BlockWise128x128"))


@functools.lru_cache(maxsize=None)
def probe() -> Capabilities:
    """This process's capabilities (computed once; the current CUDA device when there is one)."""
    cuda = torch.cuda.is_available()
    name = capability = None
    if cuda:
        device = torch.cuda.current_device()
        name = torch.cuda.get_device_name(device)
        capability = tuple(torch.cuda.get_device_capability(device))
    te_version = None
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401

        te_version = str(getattr(transformer_engine, "__version__", "present"))
    except Exception:  # ImportError, OSError for missing CUDA libraries, ...
        pass
    return Capabilities(cuda=cuda, device_name=name, capability=capability,
                        cuda_version=_version_tuple(torch.version.cuda),
                        torch_version=_version_tuple(torch.__version__) or (0, 0),
                        blockwise_scaled_mm=_blockwise_api(), te=te_version is not None,
                        te_version=te_version)


def _torch_blockers(c: Capabilities) -> str:
    """Why the 'torch' backend cannot run with `c` ('' when it can)."""
    if not c.cuda:
        return "no CUDA device (torch's blockwise FP8 GEMMs run on CUDA only)"
    if c.capability is None or c.capability[0] != HOPPER:
        return (f"the GPU ({c.device_name}, SM{''.join(map(str, c.capability or ()))}) is not "
                "SM 9.x: torch's DeepSeek-style 1x128/128x128 scaled_mm runs on Hopper only")
    if c.cuda_version is None or c.cuda_version < MIN_CUDA:
        return (f"CUDA {c.cuda_version} is older than {MIN_CUDA[0]}.{MIN_CUDA[1]} (cuBLASLt's "
                "blockwise scale modes)")
    if c.torch_version < MIN_TORCH or not c.blockwise_scaled_mm:
        return (f"torch {c.torch_version[0]}.{c.torch_version[1]} has no F.scaled_mm with "
                f"ScalingType.BlockWise1x128/BlockWise128x128 (needs torch >= "
                f"{MIN_TORCH[0]}.{MIN_TORCH[1]})")
    return ""


def _te_blockers(c: Capabilities, fp8: bool = False) -> str:
    if not c.te:
        return "Transformer Engine is not importable (transformer_engine.pytorch)"
    if not c.cuda:
        return "no CUDA device (Transformer Engine's modules run on CUDA only)"
    if fp8 and (c.capability is None or c.capability < (9, 0)
                or c.cuda_version is None or c.cuda_version < MIN_CUDA):
        # (TE asserts it when its autocast is entered: _compute_fp8_block_scaling_support)
        return (f"the FP8 recipe runs on Transformer Engine's Float8BlockScaling, which needs SM "
                f">= 9.0 and CUDA >= {MIN_CUDA[0]}.{MIN_CUDA[1]} ({c.device_name}: "
                f"SM{''.join(map(str, c.capability or ()))}, CUDA {c.cuda_version})")
    return ""


def available_backends(caps: Optional[Capabilities] = None, fp8: bool = False) -> Dict[str, str]:
    """{backend: '' if it can run with `caps` (default: this process), else why not}; `fp8`:
    with an FP8 recipe configured."""
    c = probe() if caps is None else caps
    return {"emulated": "", "torch": _torch_blockers(c), "te": _te_blockers(c, fp8)}


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    name: str  # one of GEMM_BACKENDS
    reason: str
    requested: Optional[str] = None  # the config's value (None: auto)

    def message(self) -> str:
        how = "auto" if self.requested is None else f"requested {self.requested!r}"
        return f"GEMM backend {self.name!r} (dsv3_gemm_backend: {how}): {self.reason}"


def choose_backend(requested: Optional[str], caps: Optional[Capabilities] = None,
                   fp8: bool = False) -> BackendChoice:
    """The backend for `requested` (None: auto) given `caps` (default: this process) and whether
    an FP8 recipe is configured (`fp8`: Transformer Engine then needs its block scaling).

    Auto: 'te' when Transformer Engine imports and CUDA is present, else 'torch' when torch's
    blockwise FP8 GEMMs run here, else 'emulated'. ValueError naming dsv3_gemm_backend when
    `requested` is unknown or cannot run here."""
    c = probe() if caps is None else caps
    if requested is not None and requested not in GEMM_BACKENDS:
        raise ValueError(f"dsv3_gemm_backend={requested!r} is invalid: allowed values are None "
                         f"(auto), {', '.join(repr(b) for b in GEMM_BACKENDS)}")
    blockers = available_backends(c, fp8)
    if requested is None:
        if not blockers["te"]:
            return BackendChoice("te", f"auto: Transformer Engine {c.te_version} and CUDA "
                                       f"({c.device_name}) are present")
        if not blockers["torch"]:
            return BackendChoice("torch", f"auto: {c.device_name} (SM{c.capability[0]}"
                                          f"{c.capability[1]}) runs torch's blockwise scaled_mm "
                                          f"(torch {c.torch_version[0]}.{c.torch_version[1]}); "
                                          f"Transformer Engine: {blockers['te']}")
        return BackendChoice("emulated", f"auto: portable torch GEMMs; 'te': {blockers['te']}; "
                                         f"'torch': {blockers['torch']}")
    if blockers[requested]:
        runnable = [b for b, why in blockers.items() if not why]
        raise ValueError(f"dsv3_gemm_backend={requested!r} cannot run here: {blockers[requested]}."
                         f" Backends that can run here: {', '.join(repr(b) for b in runnable)} "
                         "(or None for auto)")
    return BackendChoice(requested, "requested and available", requested)


_LOGGED = set()


def resolve(config, caps: Optional[Capabilities] = None) -> BackendChoice:
    """The backend for `config.dsv3_gemm_backend` here; each distinct decision is logged once."""
    choice = choose_backend(getattr(config, "dsv3_gemm_backend", None), caps, fp8_on(config))
    key = (choice.name, choice.requested, choice.reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(choice.message())
    return choice
