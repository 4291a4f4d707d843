"""Checkpoints: DeepSeek-V3's HF layout in and out (BF16 or FP8 128x128 blocks), streamed.

    from megatron_dsv3.checkpoint import config_from_hf, load_hf, save_hf   (= checkpoint.hf)

`hf` (the HF layout on a built model), `convert` (HF <-> Megatron distributed checkpoints without
building a model; `python -m megatron_dsv3.checkpoint convert`), `dist` (Megatron distributed
checkpoints of a built model), `commit` (atomic, verified directories).
"""

import importlib

# imported on first use: the trainer imports `commit` alone, without the model side
_LAZY = {"config_from_hf": "hf", "config_to_hf": "hf", "load_hf": "hf", "save_hf": "hf",
         "HFReader": "hf"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
