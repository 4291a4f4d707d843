"""From trained model to deployment: post-training quantisation with nvidia-modelopt and export
as an HF checkpoint that TensorRT-LLM, vLLM and SGLang load (and our own load_hf / generate).

    python -m megatron_dsv3.export --checkpoint DIR --quant fp8-block --calib 64 --out OUT

    from megatron_dsv3.export import export
    report = export("runs/tiny", "out/int4", "int4-awq", group_size=32)

nvidia-modelopt is the optional `[deploy]` extra, imported only here. `modelopt_plugin` registers
our linears and routed experts with modelopt's quantisation registry, `quantize` configures,
checks and calibrates, `hf_writer` writes the checkpoint, `formats` lists what is offered.
"""

from megatron_dsv3.lazy import lazy_attributes

_LAZY = {"export": "api", "load_model": "api", "FORMATS": "formats", "get_format": "formats"}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = list(_LAZY)
