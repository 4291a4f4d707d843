"""One MTP module, usable inside Megatron's MultiTokenPredictionBlock.

Depth k takes the previous depth's hidden state h^{k-1}_i and the embedding of token i+k:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]      (eh_proj: 2h -> h)
    h^k_i = RMSNorm(TransformerLayer_k(h'_i))                    (then the shared output head)
The embedding and the output head are the main model's; the loss of depth k (labels shifted k
further) is weighted by lambda / D and added to the main loss by the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_dsv3 import compat
from megatron_dsv3.core.linear import KeyedInit


def roll_left(t: torch.Tensor, fill=0) -> torch.Tensor:
    """Shift [b, s] one position to the left along s, filling the end with `fill`."""
    out = torch.roll(t, shifts=-1, dims=-1)
    out[..., -1] = fill
    return out


def shifted_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """A padding mask one depth further: position i then reads token i + 1, and the last
    position reads no token at all, so it is padding (True), never a routed token."""
    return roll_left(padding_mask, fill=True)


@dataclass
class MTPLayerSubmodules:
    enorm: Union[ModuleSpec, type] = None
    hnorm: Union[ModuleSpec, type] = None
    eh_proj: Union[ModuleSpec, type] = None
    transformer_layer: Union[ModuleSpec, type] = None
    layer_norm: Union[ModuleSpec, type] = None


class MTPLayer(MegatronModule):
    def __init__(self, config, submodules: MTPLayerSubmodules, layer_number: int = 1,
                 vp_stage=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        self.layer_number = layer_number  # depth k, 1-based
        self.global_number = config.num_layers + layer_number
        h = config.hidden_size
        norm = dict(config=config, hidden_size=h, eps=config.layernorm_epsilon)
        self.enorm = build_module(submodules.enorm, **norm)
        self.hnorm = build_module(submodules.hnorm, **norm)
        tp_group = getattr(pg_collection, "tp", None)
        self.eh_proj = build_module(
            submodules.eh_proj, 2 * h, h, config=config, gather_output=True, bias=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="eh_proj", tp_group=tp_group,
            init_method=KeyedInit(config, f"layers.{self.global_number - 1}.eh_proj", (h, 2 * h), 0,
                                  tp_group))
        self.transformer_layer = build_module(
            submodules.transformer_layer, config=config, layer_number=layer_number,
            global_number=self.global_number, vp_stage=vp_stage, pg_collection=pg_collection)
        self.final_layernorm = build_module(submodules.layer_norm, **norm)

    @property
    def mtp_model_layer(self):
        """The inner transformer layer under the name megatron-core >= 0.17 uses (see compat);
        registered as `transformer_layer`, which keeps the checkpoint keys of every version."""
        return self.transformer_layer

    def forward(self, input_ids, position_ids, hidden_states, attention_mask, embedding=None,
                packed_seq_params=None, padding_mask=None, token_padding_mask=None, **_unused):
        """-> (h^k [s, b, h], input ids shifted once more, position ids shifted once more[,
        padding mask shifted once more: megatron-core >= 0.18]).

        padding_mask [b, s] (True = padding; MoE routing leaves those positions out): the
        previous depth's, as megatron-core >= 0.18 hands it from depth to depth. Shifted with the
        input ids, as Megatron does: position i at depth k reads token i + k.
        token_padding_mask: the model's own, for megatron-core < 0.18, whose MTP block hands
        every depth the same extra arguments (DeepSeekV3Model passes it there); shifted here to
        the previous depth's first."""
        if padding_mask is None:
            # (no mask: every token is real, and the last k positions at depth k still read none)
            padding_mask = token_padding_mask
            if padding_mask is None:
                padding_mask = torch.zeros(input_ids.shape, dtype=torch.bool,
                                           device=input_ids.device)
            for _ in range(self.layer_number - 1):
                padding_mask = shifted_padding(padding_mask)
        input_ids = roll_left(input_ids)
        position_ids = None if position_ids is None else roll_left(position_ids)
        padding_mask = shifted_padding(padding_mask)
        emb = embedding(input_ids=input_ids, position_ids=position_ids)
        out = self._step(emb, hidden_states, lambda x: self.transformer_layer(
            x, attention_mask=attention_mask, packed_seq_params=packed_seq_params,
            padding_mask=padding_mask)[0])
        if compat.MTP_LAYER_RETURNS_PADDING_MASK:
            return out, input_ids, position_ids, padding_mask
        return out, input_ids, position_ids

    def forward_cached(self, next_embedding: torch.Tensor, hidden_states: torch.Tensor, cache,
                       position_ids: torch.Tensor, absorbed: bool = True) -> torch.Tensor:
        """This depth over a latent cache (decoding): next_embedding [s, b, h] = Emb(t_{i+k}) and
        hidden_states [s, b, h] = h^{k-1}_i of new positions i = position_ids [b, s]; the inner
        layer runs `forward_cached` over `cache`, this depth's layer view (see
        DeepSeekV3TransformerLayer.forward_cached). -> h^k [s, b, h]."""
        return self._step(next_embedding, hidden_states, lambda x: self.transformer_layer
                          .forward_cached(x, cache, position_ids, absorbed=absorbed))

    def _step(self, emb, hidden_states, run_layer):
        """h^k = RMSNorm(run_layer(eh_proj([RMSNorm(emb); RMSNorm(h^{k-1})]))): the depth's
        computation, `run_layer` being its transformer layer over the sequence or the cache."""
        x, _ = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden_states)], dim=-1))
        return self.final_layernorm(run_layer(x))


def mtp_block_spec(config, layer_spec: ModuleSpec, norm, column_linear) -> ModuleSpec:
    """Megatron MultiTokenPredictionBlock spec with `config.mtp_num_layers` of our MTP layers."""
    layer = ModuleSpec(module=MTPLayer, submodules=MTPLayerSubmodules(
        enorm=norm, hnorm=norm, eh_proj=column_linear, transformer_layer=layer_spec, layer_norm=norm))
    return ModuleSpec(module=MultiTokenPredictionBlock,
                      submodules=MultiTokenPredictionBlockSubmodules(
                          layer_specs=[layer] * (config.mtp_num_layers or 0)))
