"""DeepSeekV3Model: Megatron's GPTModel with our layers, our MTP and a device-agnostic loss path.

The decoder, embedding, output head and checkpoint layout are GPTModel's. What changes:
- layers come from `layer_specs` (MLA does its own YaRN RoPE, so no model-level rotary),
- embedding and output head get layout-independent keyed initial weights,
- `_postprocess` computes the MTP losses (megatron_dsv3.mtp.loss) without Megatron's CUDA-only
  loss tracker and records them in `mtp_loss_tracker` for logging.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import build_module

from megatron_dsv3 import compat
from megatron_dsv3.core.init import init_normal_
from megatron_dsv3.core.linear import group_rank, init_seed_of
from megatron_dsv3.layer_specs import get_layer_spec, get_mtp_block_spec, norm_spec
from megatron_dsv3.mtp.loss import attach_mtp_losses


class DeepSeekV3Model(GPTModel):
    def __init__(self, config, *, pre_process: bool = True, post_process: bool = True,
                 mtp_process: Optional[bool] = None, vp_stage: Optional[int] = None,
                 pg_collection=None, transformer_layer_spec=None, use_te: Optional[bool] = None,
                 parallel_output: bool = True):
        layer_spec = transformer_layer_spec or get_layer_spec(config, vp_stage, use_te=use_te)
        if mtp_process is None:
            mtp_process = post_process and bool(config.mtp_num_layers)
        elif mtp_process and not config.mtp_num_layers:
            raise ValueError(f"mtp_process=True needs MTP layers: config.mtp_num_layers is "
                             f"{config.mtp_num_layers!r} (allowed with mtp_process=True: >= 1; or "
                             "pass mtp_process=False / None)")
        # Where MTP runs is the caller's decision (see the `mtp_process` property); set before
        # GPTModel's constructor, which reads it to build the MTP block and its embedding.
        self.__dict__["_mtp_process"] = bool(mtp_process)
        mtp_spec = get_mtp_block_spec(config, use_te=use_te) if mtp_process else None
        super().__init__(
            config=config, transformer_layer_spec=layer_spec, vocab_size=config.vocab_size,
            max_sequence_length=config.max_position_embeddings, pre_process=pre_process,
            post_process=post_process, parallel_output=parallel_output,
            share_embeddings_and_output_weights=False, position_embedding_type="none",
            mtp_block_spec=mtp_spec, pg_collection=pg_collection,
            vp_stage=compat.megatron_vp_stage(config, vp_stage))
        self.mtp_loss_tracker: List[torch.Tensor] = []
        if transformer_layer_spec is None and self.decoder.final_layernorm is not None:
            # A layer spec's block gets Megatron's LayerNormImpl as its final norm; ours is the
            # layers' RMSNorm (float32 statistics, one autograd node), as in our block specs.
            self.decoder.final_layernorm = build_module(
                norm_spec(config, use_te=use_te), config=config, hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon)
        self._keyed_init()

    @property
    def mtp_process(self) -> bool:
        """Whether this model (pipeline chunk) runs the MTP block: the constructor's
        `mtp_process` (default: the last stage, when the config has MTP layers).

        megatron-core 0.16 takes this from the spec alone; from 0.17 GPTModel assigns its own
        rule (MTP on the last pipeline rank, see compat), which is not where DualPipe(V) puts
        the last stage (pipeline rank 0's second chunk): Megatron would build no MTP there and
        silently train without it. Its assignment is therefore ignored."""
        return self.__dict__.get("_mtp_process", False)

    @mtp_process.setter
    def mtp_process(self, _megatron_rule: bool) -> None:
        pass

    def setup_embeddings_and_output_layer(self):
        """Megatron's version marks the embedding/output parameters and, when a later pipeline
        stage needs an embedding copy (MTP), copies it from the first stage with a CUDA
        all-reduce. Our keyed initialisation already gives every copy the same values, so only
        the marking remains (Megatron's finalize_model_grads still all-reduces the copies'
        gradients over the embedding group)."""
        if self.pre_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if self.config.pipeline_model_parallel_size == 1 or not self.mtp_process:
            return
        if self.pre_process and not self.post_process:
            self.embedding.word_embeddings.weight.shared_embedding = True
        elif self.mtp_process and not self.pre_process:
            weight = self.embedding.word_embeddings.weight
            weight.shared = True
            weight.shared_embedding = True

    def _keyed_init(self):
        if not self.config.perform_initialization:
            return
        seed, std = init_seed_of(self.config), self.config.init_method_std
        rank = group_rank(self.pg_collection.tp) if self.pg_collection.tp is not None else 0
        full = (self.vocab_size, self.config.hidden_size)
        # Megatron's embedding std (--embedding-init-method-std; its config defaults it to
        # init_method_std)
        embedding_std = getattr(self.config, "embedding_init_method_std", None) or std
        if hasattr(self, "embedding"):
            init_normal_(self.embedding.word_embeddings.weight, std=embedding_std, seed=seed,
                         key="embedding", full_shape=full, dim=0, rank=rank)
        if self.post_process and self.output_layer.weight is not None:
            init_normal_(self.output_layer.weight, std=std, seed=seed, key="output_layer",
                         full_shape=full, dim=0, rank=rank)

    def forward(self, *args, padding_mask=None, **kwargs):
        """GPTModel.forward. megatron-core < 0.18 hands `padding_mask` to the decoder only, not to
        `_postprocess` and the MTP block: it is kept here for them (see _postprocess)."""
        self.__dict__["_padding_mask"] = padding_mask
        try:
            return super().forward(*args, padding_mask=padding_mask, **kwargs)
        finally:
            self.__dict__["_padding_mask"] = None

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                     rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None,
                     decoder_input=None, attention_mask=None, inference_params=None,
                     packed_seq_params=None, sequence_len_offset=None, runtime_gather_output=None,
                     extra_block_kwargs=None, inference_context=None, padding_mask=None,
                     **_newer_megatron_kwargs):
        if padding_mask is None:
            padding_mask = self.__dict__.get("_padding_mask")
        if mtp_in_postprocess:
            # megatron-core >= 0.18's MTP block takes padding_mask and hands each depth's shifted
            # mask to the next; older blocks take none and hand every depth the same
            # extra_block_kwargs (our MTP layer shifts the model's mask to its depth)
            if padding_mask is None:
                extra = {}
            elif compat.MTP_LAYER_RETURNS_PADDING_MASK:
                extra = {"padding_mask": padding_mask}
            else:
                extra = {"extra_block_kwargs": {"token_padding_mask": padding_mask}}
            hidden_states = self.mtp(input_ids=input_ids, position_ids=position_ids,
                                     hidden_states=hidden_states, attention_mask=attention_mask,
                                     packed_seq_params=packed_seq_params, embedding=self.embedding,
                                     **extra)
        if not self.post_process:
            return hidden_states
        depth = self.config.mtp_num_layers or 0
        if depth and mtp_in_postprocess:
            chunks = torch.chunk(hidden_states, 1 + depth, dim=0)
            hidden_states = chunks[0]
            if labels is not None:
                hidden_states = self._attach_mtp_losses(hidden_states, chunks[1:], labels,
                                                        loss_mask, runtime_gather_output)
        logits, _ = self.output_layer(hidden_states, runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def _attach_mtp_losses(self, hidden_states, mtp_hidden, labels, loss_mask, gather):
        """megatron_dsv3.mtp.loss with our output head and loss; the per-depth losses go to
        `mtp_loss_tracker` when training."""
        hidden_states, losses = attach_mtp_losses(
            hidden_states, mtp_hidden, labels, loss_mask,
            logits_of=lambda h: self.output_layer(h, runtime_gather_output=gather)[0],
            token_loss=self.compute_language_model_loss,
            scaling_factor=self.config.mtp_loss_scaling_factor,
            per_token_loss=self.config.calculate_per_token_loss)
        if self.training:
            self.mtp_loss_tracker.append(losses)
        return hidden_states

    def pop_mtp_losses(self) -> Optional[torch.Tensor]:
        """Mean MTP loss per depth over the forwards since the last call (None without MTP)."""
        if not self.mtp_loss_tracker:
            return None
        out = torch.stack(self.mtp_loss_tracker).mean(0)
        self.mtp_loss_tracker.clear()
        return out


def build_model(config, **kwargs) -> DeepSeekV3Model:
    """A whole (single-stage) DeepSeek-V3 model; kwargs as DeepSeekV3Model."""
    return DeepSeekV3Model(config, **kwargs)
