"""Which GEMMs a linear layer runs, decided from the config at construction time."""

from megatron_dsv3.core.gemm import DEFAULT_GEMM, Gemm


def gemm_for_config(config) -> Gemm:
    """The GEMM strategy for a linear layer built with `config` (plain GEMMs unless FP8 is on)."""
    if getattr(config, "fp8", None):
        raise ValueError(f"fp8={config.fp8!r}: the FP8 recipe is not available in this build "
                         "(allowed values: None)")
    return DEFAULT_GEMM
