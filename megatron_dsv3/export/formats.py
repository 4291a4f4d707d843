"""The quantisation formats `python -m megatron_dsv3.export` offers (no modelopt import here).

Each is one of nvidia-modelopt's stock configurations (`mtq.<config>`) and an HF layout:

- `deepseek-fp8`: DeepSeek's own release layout - E4M3 weights in 128x128 blocks with a float32
  `weight_scale_inv` per block and DeepSeek's `quantization_config` (what our `save_hf(fp8=True)`,
  vLLM's and SGLang's DeepSeek-V3 loaders and transformers' FineGrainedFP8 read).
- `modelopt`: modelopt's unified HF layout - `weight` in the format's storage type with
  `weight_scale` (and `input_scale`, `pre_quant_scale` where the format has them),
  `hf_quant_config.json` and a `quantization_config` with quant_method "modelopt" (what
  TensorRT-LLM, vLLM and SGLang read for modelopt checkpoints).

Whether a format runs on this machine is modelopt's decision: `quantize.check_runs_here` quantises a
small linear with the format's configuration on the target device and reports modelopt's reason
when it cannot (e.g. NVFP4's fake quantisation needs CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Format:
    name: str
    mtq_config: str  # attribute of modelopt.torch.quantization
    layout: str  # 'deepseek-fp8' or 'modelopt'
    quant_algo: Optional[str]  # hf_quant_config's quant_algo (modelopt layout)
    description: str
    # the weight quantiser's block along the input dimension: allowed values (first: default)
    group_sizes: Tuple[int, ...] = ()
    # what our loader (load_hf) can read back, dequantised
    readable: bool = True
    # whether our HF writer produces its tensors (NVFP4's packed FP4: not built without a GPU)
    writable: bool = True


FORMATS = {f.name: f for f in (
    Format("fp8-block", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "deepseek-fp8", None,
           "E4M3 weights in 128x128 blocks, activations as trained (DeepSeek-V3's release layout)"),
    Format("fp8", "FP8_DEFAULT_CFG", "modelopt", "FP8",
           "E4M3 weights and activations, one static scale per tensor"),
    Format("int8-wo", "INT8_WEIGHT_ONLY_CFG", "modelopt", "W8A16",
           "INT8 weights, one scale per output channel; activations in 16 bits"),
    Format("int4-awq", "INT4_AWQ_CFG", "modelopt", "W4A16_AWQ",
           "INT4 weights in groups along the input dimension, AWQ activation-aware scaling",
           group_sizes=(128, 64, 32)),
    Format("nvfp4", "NVFP4_DEFAULT_CFG", "modelopt", "NVFP4",
           "FP4 (E2M1) weights and activations in groups of 16 with E4M3 scales (Blackwell)",
           group_sizes=(16,), readable=False, writable=False),
)}

# the modules that stay in high precision unless asked: modelopt's stock configurations already
# leave out Megatron's `*router*`, `*output_layer*` and `mtp.*`; the embedding and norms are not
# linears and get no quantiser at all
OPTIONAL_MODULES = {"mtp": "mtp.*", "head": "*output_layer*"}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"--quant {name!r} is not a format we export: allowed values are "
                         f"{sorted(FORMATS)}")
    return FORMATS[name]
