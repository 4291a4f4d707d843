"""FP8 training with DeepSeek-V3's fine-grained scaling (1x128 activation tiles, 128x128 weight
blocks, FP32 promotion): quantisers, blockwise GEMM, the recipe and its Transformer Engine adapter."""
