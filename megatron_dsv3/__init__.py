"""megatron-dsv3: DeepSeek-V3's training system as a Megatron-Core plugin.

    model = megatron_dsv3.from_hf("DeepSeek-V3/")   # HF checkpoint -> DeepSeekV3Model (eval)

Sub-packages, one per capability: `configs`, `attention` (MLA), `moe` (DeepSeek-MoE), `mtp`,
`fp8`, `dispatch` (expert parallelism), `pipeline` (DualPipe), `checkpoint`, `inference`,
`training`; `layer_specs` binds them into Megatron's spec system and `model` builds a GPTModel
from them. `from_hf` (megatron_dsv3.api) is imported on first use, so `import megatron_dsv3`
stays light.
"""

import warnings

# megatron-core announces at import time that it falls back to torch when Transformer Engine and
# apex are absent. That is our portable path by design, so the notice is silenced.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# TransformerConfig's own default cuda_graph_scope triggers this notice on every construction.
warnings.filterwarnings("ignore", message="full scope is deprecated.*")

__version__ = "0.1.0"


def __getattr__(name: str):
    # the library entry points, imported on first use (they pull in megatron-core and the model)
    if name == "from_hf":
        from megatron_dsv3.api import from_hf

        return from_hf
    raise AttributeError(f"module 'megatron_dsv3' has no attribute {name!r}")


__all__ = ["from_hf"]
