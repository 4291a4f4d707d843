"""A small trainer for the examples: Megatron's data path (indexed dataset + GPTDataset), AdamW,
aux-loss-free bias updates, and the logs a DeepSeek-V3 user reads."""

import importlib

# imported on first use (the trainer pulls in megatron-core and the model)
_LAZY = {"Trainer": "trainer", "TrainArgs": "trainer", "ZeroOneOptimizer": "zero",
         "build_train_dataset": "data"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
