"""megatron-dsv3: DeepSeek-V3's training system as a Megatron-Core plugin.

Sub-packages, one per capability: `configs`, `attention` (MLA), `moe` (DeepSeek-MoE), `mtp`,
`fp8`, `dispatch` (expert parallelism), `pipeline` (DualPipe), `checkpoint`; `layer_specs` binds
them into Megatron's spec system and `model` builds a GPTModel from them.
"""

import warnings

# megatron-core announces at import time that it falls back to torch when Transformer Engine and
# apex are absent. That is our portable path by design, so the notice is silenced.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# TransformerConfig's own default cuda_graph_scope triggers this notice on every construction.
warnings.filterwarnings("ignore", message="full scope is deprecated.*")

__version__ = "0.1.0"
