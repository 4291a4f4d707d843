"""What pipeline tests compare: random language-model micro-batches in the executor's batch
format, a pipelined rank's gradients under the unpipelined model's parameter names, and a tiny
stage for tests of the executor's transfers."""

from __future__ import annotations

from typing import Dict, List

import torch


def random_lm_batches(n: int, batch: int, seq: int, seed: int, vocab: int = 255) -> List[Dict]:
    """`n` micro-batches of `batch` x `seq` random tokens in [1, vocab) with next-token labels,
    positions and an all-ones loss mask, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch, seq + 1), generator=g)
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:],
                    "position_ids": torch.arange(seq).expand(batch, seq),
                    "loss_mask": torch.ones(batch, seq)})
    return out


def global_name(chunk, name: str) -> str:
    """A chunk's parameter or buffer name as the whole model names it: the chunk's local layer i
    renamed to its global layer number."""
    if name.startswith("decoder.layers."):
        local = int(name.split(".")[2])
        number = chunk.decoder.layers[local].layer_number
        name = name.replace(f"decoder.layers.{local}.", f"decoder.layers.{number - 1}.", 1)
    return name


def grads_by_global_name(chunks) -> Dict[str, torch.Tensor]:
    """Copies of the gradients of `chunks` (a rank's model chunks), keyed by the parameter names
    of the whole model (`global_name`)."""
    return {global_name(chunk, name): p.grad.clone()
            for chunk in chunks for name, p in chunk.named_parameters() if p.grad is not None}


class TinyStage(torch.nn.Module):
    """A pipeline stage of one scaled copy, y = x * w, with the attributes Megatron's schedules
    read (`config`, `model_type`, `set_input_tensor`): for tests of what the executor sends,
    receives and computes, not of a model."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        from megatron.core.transformer.enums import ModelType
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1,
                                        pipeline_dtype=torch.float32,
                                        params_dtype=torch.float32)
        self.model_type = ModelType.encoder_or_decoder
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.input = None

    def set_input_tensor(self, tensor):
        self.input = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, x=None):
        return (self.input if self.input is not None else x) * self.weight


def tiny_forward_step(data_iterator, model):
    """Megatron's forward_step_func for TinyStage: the batch is the first stage's input; the loss
    is the output's mean."""
    x = next(data_iterator)

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return model(x), loss_func
