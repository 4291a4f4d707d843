"""The DeepSeek-MoE block: shared expert + fine-grained routed experts behind a dispatcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_dsv3.core.recompute import checkpointed

if TYPE_CHECKING:
    from megatron_dsv3.dispatch.base import TokenDispatcher


def valid_tokens(padding_mask: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """[s * b] bool, True for a routed token, from padding_mask [b, s] (True or nonzero =
    padding, as Megatron's MoELayer reads it) in the hidden states' [s, b] token order."""
    if tuple(padding_mask.shape) != (b, s):
        raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}: allowed is "
                         f"[batch, sequence] = ({b}, {s}), the hidden states being [{s}, {b}, h]")
    if padding_mask.is_floating_point() or padding_mask.is_complex():
        raise ValueError(f"padding_mask has dtype {padding_mask.dtype}: allowed are bool "
                         "(True = padding) or an integer 0/1 mask (a float mask is most often "
                         "a loss_mask, whose 1 means keep)")
    return ~padding_mask.bool().transpose(0, 1).reshape(-1)


@dataclass
class DeepSeekMoESubmodules:
    router: Union[ModuleSpec, type] = None
    experts: Union[ModuleSpec, type] = None
    shared_experts: Union[ModuleSpec, type] = None
    dispatcher: Optional[Callable[..., "TokenDispatcher"]] = None
    """(config, ep_group) -> TokenDispatcher, called once per layer; the binding's default is
    megatron_dsv3.layer_specs.make_dispatcher."""


def _expert_parallel_group(pg_collection=None):
    group = getattr(pg_collection, "ep", None)
    if group is None:
        group = parallel_state.get_expert_model_parallel_group(check_initialized=False)
    return group


class DeepSeekMoE(MegatronModule):
    """y = SharedExpert(x) + sum_k w_k Expert_{i_k}(x), dropless.

    `router.local_tokens_per_expert` accumulates expert loads between bias updates and
    `router.last_aux_loss` / `router.last_z_loss` hold the latest balancing and z losses, for
    logging.
    """

    def __init__(self, config, submodules: DeepSeekMoESubmodules, layer_number: int = 1,
                 pg_collection=None, **_unused):
        super().__init__(config=config)
        key = f"layers.{layer_number - 1}.mlp"
        self.layer_number = layer_number
        self.router = build_module(submodules.router, config=config, key=f"{key}.gate")
        if submodules.dispatcher is None:
            raise ValueError("DeepSeekMoESubmodules.dispatcher is None: the spec must give a "
                             "dispatcher factory (config, ep_group) -> TokenDispatcher, e.g. "
                             "megatron_dsv3.layer_specs.make_dispatcher")
        self.dispatcher = submodules.dispatcher(config, _expert_parallel_group(pg_collection))
        self.experts = build_module(submodules.experts, config=config,
                                    num_local_experts=self.dispatcher.num_local_experts,
                                    local_expert_offset=self.dispatcher.local_expert_offset,
                                    key=f"{key}.experts", pg_collection=pg_collection)
        # Redundant experts (megatron_dsv3.moe.eplb.apply_placement): the logical -> physical map
        self.replicas, self.placement = None, None
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            self.shared_experts = build_module(
                submodules.shared_experts, config=config,
                ffn_hidden_size=config.moe_shared_expert_intermediate_size,
                key=f"{key}.shared_experts", tp_group=getattr(pg_collection, "tp", None))
        self._tp_group = getattr(pg_collection, "tp", None)
        self._tp_copies_checked = False

    def _refuse_tp_copies_in_training(self) -> None:
        """Tensor-parallel ranks hold the same tokens (we run without sequence parallelism). An
        expert-parallel group that holds several ranks of one tensor-parallel group would have
        each of them dispatch those tokens: the outputs are right, but every expert sees each
        token once per such rank, and its weight gradient is multiplied by that count."""
        self._tp_copies_checked = True
        ep = self.dispatcher.ep_group
        if ep is None or ep.size() == 1 or not torch.distributed.is_initialized():
            return
        tp = self._tp_group
        if tp is None:
            tp = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        if tp is None or tp.size() == 1:
            return
        shared = (set(torch.distributed.get_process_group_ranks(ep))
                  & set(torch.distributed.get_process_group_ranks(tp)))
        if len(shared) > 1:
            raise ValueError(
                f"training with tensor_model_parallel_size={tp.size()} and "
                f"expert_model_parallel_size={ep.size()} where the expert-parallel group holds "
                f"tensor-parallel peers (ranks {sorted(shared)}): they hold the same tokens, so "
                "every expert would get each token once per peer and a multiplied weight "
                "gradient. Allowed for training: tensor_model_parallel_size=1 with expert "
                "parallelism (DeepSeek-V3 trains without tensor parallelism), or expert-parallel "
                "groups across tensor-parallel groups only; this layout serves correctly")

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                **_unused):
        if self.training and torch.is_grad_enabled() and not self._tp_copies_checked:
            self._refuse_tp_copies_in_training()
        if self.placement is not None and torch.is_grad_enabled():
            # (the replicas are frozen copies: their gradients would be lost or, once trainable,
            # differ between the copies of one expert)
            raise ValueError("this MoE layer's experts were re-laid for serving "
                             "(megatron_dsv3.moe.eplb.apply_placement): run it without gradients "
                             "(torch.no_grad / inference_mode), and train the model before "
                             "applying a placement")
        s, b, h = hidden_states.shape
        x = hidden_states.reshape(s * b, h)
        valid = None if padding_mask is None else valid_tokens(padding_mask, b, s)
        weights, indices, aux_loss = self.router(x, seq_len=s, valid=valid)
        if self.replicas is not None:
            indices = self.replicas(indices)
        out = self.dispatcher.forward_experts(x, indices, weights, self.experts)
        if self.shared_experts is not None:
            shared, _ = checkpointed(self.config, "shared_experts", self.shared_experts)(x)
            out = out + shared
        if aux_loss is not None:
            # The aux loss joins the backward pass through the output, scaled like the main loss
            # by whichever schedule runs us (Megatron's schedules set this scale).
            out = MoEAuxLossAutoScaler.apply(out, aux_loss)
        return out.view(s, b, h), None
