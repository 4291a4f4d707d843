"""Checkpoints: DeepSeek-V3's HF layout in and out (BF16 or FP8 128x128 blocks), streamed."""
