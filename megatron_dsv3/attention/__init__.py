"""Multi-head Latent Attention (MLA) with YaRN RoPE, a portable core attention and an absorbed
decode path over a latent cache (c_kv and k_rope only)."""

from megatron_dsv3.attention.core import SDPAttention
from megatron_dsv3.attention.mla import MLASelfAttention, MLASubmodules
from megatron_dsv3.attention.rope import YarnRotary

__all__ = ["MLASelfAttention", "MLASubmodules", "SDPAttention", "YarnRotary"]
