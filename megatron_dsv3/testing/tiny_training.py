"""A few optimizer steps on windows of a repeated text, so that a tiny model (and its MTP head)
has something to predict: shared by the speculative-decoding tests and benchmark."""

from __future__ import annotations

import torch


def train_on_repeated_text(model, text: bytes, steps: int = 30, batch: int = 8, seq: int = 32,
                           lr: float = 1e-2, seed: int = 0):
    """`steps` AdamW steps of LM + MTP loss on random windows of `text` repeated; returns the
    model in eval mode (byte-level tokens: a vocabulary of at least 256)."""
    data = torch.tensor(list(text * 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        windows = torch.stack([data[s:s + seq + 1] for s in start])
        loss = model(windows[:, :-1], torch.arange(seq).expand(batch, seq), None,
                     labels=windows[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.pop_mtp_losses()
    return model.eval()
