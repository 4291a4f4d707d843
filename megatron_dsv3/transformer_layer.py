"""The DeepSeek-V3 decoder layer: MLA, then a dense SwiGLU MLP or DeepSeek-MoE.

The choice between dense and MoE is made from the layer's *global* number (Megatron's 1-based
numbering, the MTP layers following the decoder), so the same spec builds the right layer on every
pipeline stage. Megatron's TransformerBlock fans the spec out over the stage's layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import GraphableMegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron_dsv3 import compat
from megatron_dsv3.configs import is_moe_layer, validate_config
from megatron_dsv3.core.recompute import checkpointed, recompute_region
from megatron_dsv3.upstream_flags import check_spec_route_args


@dataclass
class DeepSeekV3LayerSubmodules:
    input_layernorm: Union[ModuleSpec, type] = None
    self_attention: Union[ModuleSpec, type] = None
    pre_mlp_layernorm: Union[ModuleSpec, type] = None
    dense_mlp: Union[ModuleSpec, type] = None
    moe: Union[ModuleSpec, type] = None
    sharded_state_dict_keys_map: Dict[str, str] = field(default_factory=dict)


def global_layer_number(config, layer_number: int, vp_stage=None, pg_collection=None) -> int:
    """Megatron's global number of local layer `layer_number` on this stage (its layer offset)."""
    return layer_number + compat.layer_offset(config, vp_stage, getattr(pg_collection, "pp", None))


class DeepSeekV3TransformerLayer(TransformerLayer):
    """hidden -> hidden + MLA(RMSNorm(hidden)) -> h + FFN(RMSNorm(h)), FFN dense or MoE.

    A TransformerLayer for Megatron (TransformerBlock, MTP and checkpointing treat it as one);
    its modules and forward are ours, free of CUDA-only code paths.
    """

    def __init__(self, config, submodules: DeepSeekV3LayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None,
                 vp_stage: Optional[int] = None, global_number: Optional[int] = None, **_unused):
        validate_config(config)
        check_spec_route_args()  # (Megatron-LM's GPTModel around us: its embedding and head)
        # TransformerLayer.__init__ builds Megatron's own MLP/MoE; we build ours instead and keep
        # the attributes Megatron's block, MTP and checkpointing read.
        GraphableMegatronModule.__init__(self, config=config, vp_stage=vp_stage)
        if pg_collection is None:
            pg_collection = compat.default_pg_collection()
        self.pg_collection = pg_collection
        self.tp_group = getattr(pg_collection, "tp", None)
        self.submodules_config = submodules
        # `global_number` is given where Megatron's offset does not place the layer: MTP layers
        # (num_layers + depth) and DualPipe chunks (a spec param, megatron_dsv3.model_chunks).
        self.layer_number = global_number or global_layer_number(config, layer_number, vp_stage,
                                                                 pg_collection)
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout

        norm_kw = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.input_layernorm = build_module(submodules.input_layernorm, **norm_kw)
        self.self_attention = build_module(submodules.self_attention, config=config,
                                           layer_number=self.layer_number,
                                           pg_collection=pg_collection)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, **norm_kw)
        self.is_moe_layer = is_moe_layer(config, self.layer_number)
        key = f"layers.{self.layer_number - 1}.mlp"
        if self.is_moe_layer:
            self.mlp = build_module(submodules.moe, config=config, layer_number=self.layer_number,
                                    pg_collection=pg_collection)
        else:
            self.mlp = build_module(submodules.dense_mlp, config=config, key=key,
                                    tp_group=self.tp_group)

    def _dropout_add(self, out, bias, residual):
        if bias is not None:
            out = out + bias
        if self.training and self.hidden_dropout > 0:
            out = F.dropout(out, p=self.hidden_dropout)
        return residual + out

    def _attention_half(self, hidden_states, attend):
        """hidden + attend(RMSNorm(hidden)): the first half of both entry points, `attend` being
        MLA over the sequence (training) or over the latent cache (decoding)."""
        norm, release = recompute_region(self.config, "layernorm", self.input_layernorm)
        attn_out, attn_bias = attend(norm(hidden_states))
        release(attn_out)
        return self._dropout_add(attn_out, attn_bias, hidden_states)

    def forward_attention(self, hidden_states, attention_mask=None, packed_seq_params=None):
        """First half of the layer: hidden + MLA(RMSNorm(hidden))."""
        return self._attention_half(hidden_states, lambda x: self.self_attention(
            x, attention_mask=attention_mask, packed_seq_params=packed_seq_params))

    def forward_mlp(self, hidden_states, padding_mask=None):
        """Second half: hidden + FFN(RMSNorm(hidden))."""
        norm, release = recompute_region(self.config, "layernorm", self.pre_mlp_layernorm)
        mlp = self.mlp if self.is_moe_layer else checkpointed(self.config, "mlp", self.mlp)
        mlp_out, mlp_bias = mlp(norm(hidden_states), padding_mask=padding_mask)
        release(mlp_out)
        return self._dropout_add(mlp_out, mlp_bias, hidden_states)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                packed_seq_params=None, padding_mask=None, inference_context=None,
                inference_params=None, **_unused):
        if inference_context is not None or inference_params is not None:
            # (ignored, a decode step would attend to its new tokens only)
            raise ValueError(
                "Megatron's KV-cache inference (inference_context / inference_params) is not "
                "supported by megatron-dsv3's layers: decode with megatron_dsv3.generate or "
                "megatron_dsv3.inference.InferenceEngine (MLA's latent cache), or run full "
                "forwards without an inference context")
        hidden = self.forward_attention(hidden_states, attention_mask, packed_seq_params)
        output = self.forward_mlp(hidden, padding_mask)
        output = make_viewless_tensor(output, requires_grad=output.requires_grad, keep_graph=True)
        return output, None

    def forward_cached(self, hidden_states: torch.Tensor, cache, position_ids: torch.Tensor,
                       absorbed: bool = True) -> torch.Tensor:
        """The layer over a latent cache (decoding): the same two halves as `forward`, with MLA
        reading every earlier token from the cache instead of the sequence.

        hidden_states [s, b, h] are new tokens at position_ids [b, s]. `cache` is this layer's view
        of the cache for the batch (megatron_dsv3.inference.decoder.LayerCacheView):
        `cache.update(c_kv [b, s, c], k_rope [b, s, dr])` stores the new tokens' latents and
        returns every key's (c_kv [b, T, c], k_rope [b, T, dr], key_mask [b, T]);
        `cache.attention_span()` brackets the attention half (a timeline record when traced).
        `absorbed=False` reads the cache through the un-absorbed formula (comparison only).
        -> hidden [s, b, h].
        """
        with cache.attention_span():
            hidden = self._attention_half(hidden_states, lambda x: self.self_attention.forward_cached(
                x, position_ids, cache, absorbed=absorbed))
        return self.forward_mlp(hidden)

    def __call__(self, *args, **kwargs):
        # Bypass TransformerLayer.__call__'s CUDA-graph dispatch: plain module call.
        return torch.nn.Module.__call__(self, *args, **kwargs)
