"""DeepSeek-V3 configurations as Megatron config objects.

`get_config(name, **overrides)` returns a `DeepSeekV3Config`, a subclass of Megatron's
`MLATransformerConfig`: every DeepSeek-V3 concept is expressed with Megatron's own field
(`moe_layer_freq` for "first k layers dense", `moe_router_num_groups`/`moe_router_group_topk` for
node-limited routing, `mtp_num_layers`, ...). The subclass adds only what Megatron keeps outside the
config (vocabulary size, maximum sequence length) and our deterministic-initialisation seed.
"""

from megatron_dsv3.configs.config import DeepSeekV3Config, latent_norm_epsilon, validate_config
from megatron_dsv3.configs.presets import PRESETS, get_config, is_moe_layer

__all__ = ["DeepSeekV3Config", "PRESETS", "get_config", "is_moe_layer", "latent_norm_epsilon",
           "validate_config"]
