"""Building blocks shared by MLA, MoE and MTP: parallel linear layers with hookable GEMMs,
RMSNorm, grouped GEMM, keyed initialisation and selective recomputation."""
