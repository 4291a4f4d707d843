"""Checkpoints: DeepSeek-V3's HF layout in and out (BF16 or FP8 128x128 blocks), streamed.

    from megatron_dsv3.checkpoint import config_from_hf, load_hf, save_hf   (= checkpoint.hf)

`hf` (the HF layout on a built model), `convert` (HF <-> Megatron distributed checkpoints without
building a model; `python -m megatron_dsv3.checkpoint convert`), `dist` (Megatron distributed
checkpoints of a built model), `commit` (atomic, verified directories).
"""

from megatron_dsv3.lazy import lazy_attributes

# imported on first use: the trainer imports `commit` alone, without the model side
_LAZY = {"config_from_hf": "hf", "config_to_hf": "hf", "load_hf": "hf", "save_hf": "hf",
         "HFReader": "hf"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
