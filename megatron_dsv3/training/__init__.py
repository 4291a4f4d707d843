"""A small trainer for the examples: Megatron's data path (indexed dataset + GPTDataset), AdamW,
aux-loss-free bias updates, and the logs a DeepSeek-V3 user reads."""

from megatron_dsv3.lazy import lazy_attributes

# imported on first use (the trainer pulls in megatron-core and the model)
_LAZY = {"Trainer": "trainer", "TrainArgs": "trainer", "ZeroOneOptimizer": "zero",
         "build_train_dataset": "data"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
