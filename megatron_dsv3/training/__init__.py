"""A small trainer for the examples: Megatron's data path (indexed dataset + GPTDataset), AdamW,
aux-loss-free bias updates, and the logs a DeepSeek-V3 user reads."""
