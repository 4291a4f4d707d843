"""What pipeline tests compare: random language-model micro-batches in the executor's batch
format, and a pipelined rank's gradients under the unpipelined model's parameter names."""

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


def grads_by_global_name(chunks) -> Dict[str, torch.Tensor]:
    """Copies of the gradients of `chunks` (a rank's model chunks), keyed by the parameter names
    of the whole model: a chunk's local layer i is renamed to its global layer number."""
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if name.startswith("decoder.layers."):
                local = int(name.split(".")[2])
                number = chunk.decoder.layers[local].layer_number
                name = name.replace(f"decoder.layers.{local}.", f"decoder.layers.{number - 1}.", 1)
            if p.grad is not None:
                out[name] = p.grad.clone()
    return out
