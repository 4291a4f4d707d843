"""FP8 training with DeepSeek-V3's fine-grained scaling (1x128 activation tiles, 128x128 weight
blocks, FP32 promotion): `quant` (quantisers and the blockwise GEMM, torch only), `gemm` (the
three GEMMs of a linear layer), `recipe` (the switch and the Transformer Engine adapter)."""
