"""Building blocks shared by MLA, MoE and MTP: parallel linear layers with hookable GEMMs,
RMSNorm, grouped GEMM, keyed initialisation and selective recomputation."""

from megatron_dsv3.lazy import lazy_attributes

# imported on first use: everything above imports from here, so nothing is imported eagerly
_LAZY = {"ColumnParallelLinear": "linear", "RowParallelLinear": "linear",
         "ReplicatedLinear": "linear", "Gemm": "gemm", "WeightGradStore": "gemm",
         "grouped_linear": "grouped_gemm", "RMSNorm": "norm", "SwiGLUMLP": "mlp",
         "recompute_region": "recompute"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
