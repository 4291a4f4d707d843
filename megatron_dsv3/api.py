"""The one-line library entry point: an HF DeepSeek-V3 checkpoint as a ready DeepSeekV3Model.

    import megatron_dsv3
    model = megatron_dsv3.from_hf("DeepSeek-V3/")              # bfloat16, eval mode, on the CPU

is `config_from_hf` + `build_model` + `load_hf` (megatron_dsv3.checkpoint.hf) with the process
world set up when there is none and without drawing initial weights the checkpoint overwrites.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from megatron_dsv3.checkpoint.hf_config import DEFAULT_DTYPE


def from_hf(path: str, dtype: torch.dtype = DEFAULT_DTYPE, *,
            device: Optional[Union[str, torch.device]] = None, mtp: Optional[bool] = None,
            **overrides: Any):
    """The DeepSeekV3Model of the HF checkpoint directory `path`, weights loaded, in eval mode.

    dtype: the parameters' dtype, bfloat16 by default (FP8 checkpoints are dequantised into it).
    device: where the parameters are created and the weights copied to (default: the CPU).
    mtp: None builds the MTP layers when the checkpoint holds them (config.json's
        num_nextn_predict_layers) and leaves them out with a warning when it does not, as after
        transformers' save_pretrained; True insists (a checkpoint without them is an error naming
        the missing tensors); False leaves them out (and leaves the checkpoint's unread).
    overrides: other DeepSeekV3Config fields (e.g. dsv3_fp8_recipe="deepseek").

    Without torch.distributed, a one-rank world is set up (megatron_dsv3.world.init_single_process);
    inside a launcher with Megatron's parallel_state set up, each rank builds and loads its
    tensor/expert-parallel slice (pipeline parallelism: build the stages and call load_hf).
    The model is built with perform_initialization=False, directly on `device`: parameters are
    allocated, not drawn. (Measured on 2 CPU cores, 447M parameters in bfloat16: building with
    random initialisation took 13-90 s, without it under 1 s; building on the meta device and
    materialising with to_empty was no faster and leaves the router's load counters
    uninitialised.) Loading the weights is then most of the time.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dsv3.checkpoint.hf import config_from_hf, load_hf
    from megatron_dsv3.model import build_model
    from megatron_dsv3.world import init_distributed, init_single_process

    if not dist.is_initialized():
        init_single_process()
    elif not parallel_state.model_parallel_is_initialized():
        init_distributed()  # parallel_state with all sizes 1 over the existing world
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:
        raise ValueError(f"from_hf builds the whole model on every rank, but the pipeline-parallel "
                         f"size is {pp}: build this rank's stages and fill them with "
                         "megatron_dsv3.checkpoint.hf.load_hf")
    overrides.setdefault("tensor_model_parallel_size",
                         parallel_state.get_tensor_model_parallel_world_size())
    overrides.setdefault("expert_model_parallel_size",
                         parallel_state.get_expert_model_parallel_world_size())
    overrides.setdefault("expert_tensor_parallel_size",
                         parallel_state.get_expert_tensor_parallel_world_size())
    # perform_initialization=False: parameters are torch.empty, filled by load_hf below;
    # use_cpu_initialization=True: they are created where torch.device(...) says (Megatron's
    # modules otherwise put them on the current CUDA device).
    overrides.update(perform_initialization=False, use_cpu_initialization=True)
    config = config_from_hf(path, dtype=dtype, mtp=mtp, **overrides)
    with torch.device(device or "cpu"):
        model = build_model(config)
    load_hf(model, path, skip_mtp=not config.mtp_num_layers)  # (mtp=False or mtp_num_layers=None)
    return model.eval()
