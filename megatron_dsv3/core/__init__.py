"""Building blocks shared by MLA, MoE and MTP: parallel linear layers with hookable GEMMs,
RMSNorm, grouped GEMM, keyed initialisation and selective recomputation."""

import importlib

# imported on first use: everything above imports from here, so nothing is imported eagerly
_LAZY = {"ColumnParallelLinear": "linear", "RowParallelLinear": "linear",
         "ReplicatedLinear": "linear", "Gemm": "gemm", "WeightGradStore": "gemm",
         "grouped_linear": "grouped_gemm", "RMSNorm": "norm", "SwiGLUMLP": "mlp",
         "recompute_region": "recompute"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
