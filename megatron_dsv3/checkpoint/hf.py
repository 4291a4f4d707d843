"""`megatron_dsv3.checkpoint.hf`: DeepSeek-V3 HF checkpoints in and out of our model.

    config = config_from_hf("DeepSeek-V3/")                 # HF config.json -> DeepSeekV3Config
    model = build_model(config); load_hf(model, "DeepSeek-V3/")   # this rank's TP/PP/EP slice
    save_hf(model, "out/", fp8=True)                         # DeepSeek's layout: FP8 128x128 blocks

(`megatron_dsv3.from_hf(path)` does the first two lines in one call, without random
initialisation.) MTP: the checkpoint's `model.layers.{num_hidden_layers + k}` modules are built
and loaded when they are there; a checkpoint without them although its config.json sets
num_nextn_predict_layers (transformers' save_pretrained writes none) gets a config without MTP
and a warning naming the file, unless config_from_hf(..., mtp=True) insists (load_hf then names
the missing tensors); load_hf(..., skip_mtp=True) leaves present MTP layers unread.

The implementation lives in `hf_config` (config.json <-> config), `mapping` (tensor names, TP/EP
slices, RoPE row order), `safetensors_io` (lazy shard reading, FP8 block dequantisation, streamed
sharded writing with an index) and `hf_model` (the model side). Streaming conversion between HF
and Megatron distributed checkpoints without building a model is `convert` (and the command line
`python -m megatron_dsv3.checkpoint convert`).
"""

from megatron_dsv3.checkpoint.hf_config import config_from_hf, config_to_hf, read_hf_config
from megatron_dsv3.checkpoint.hf_model import load_hf, save_hf
from megatron_dsv3.checkpoint.safetensors_io import INDEX_FILE, HFReader

__all__ = ["config_from_hf", "config_to_hf", "read_hf_config", "load_hf", "save_hf", "HFReader",
           "INDEX_FILE"]
