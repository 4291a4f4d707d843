"""The byte-level corpus every machine has - the Python standard library's source - and the text
held out from it: the files after the first `train_bytes` (what the example trainer trains on), as
batches, and the mean LM loss of a model over them (FP8 fidelity, export calibration and quality).

Bytes 1..254 are text (valid UTF-8 never contains 0x00 or 0xFF); 0 is end-of-document.
"""

from __future__ import annotations

import os
import sysconfig
from typing import Dict, Iterator, List, Sequence

import torch

from megatron_dsv3.tokenizer import EOD


def stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "test",
                                                              "tests", "idlelib", "turtledemo"))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def stdlib_documents(max_bytes: int) -> Iterator[bytes]:
    """The stdlib's .py files in a fixed order, up to `max_bytes` in total."""
    total = 0
    for path in stdlib_files():
        with open(path, "rb") as f:
            data = f.read().replace(b"\x00", b"").replace(b"\xff", b"")
        if not data:
            continue
        yield data
        total += len(data)
        if total >= max_bytes:
            return


def heldout_batches(num_sequences: int, seq_length: int, batch_size: int,
                    train_bytes: int = 8 << 20) -> List[Dict[str, torch.Tensor]]:
    """Byte-level batches from the standard-library files that come after the first `train_bytes`
    of the corpus (the trainer's --corpus-bytes): documents no run trained on. Consecutive
    windows of seq_length + 1 bytes over the documents joined by EOD; every token counts."""
    seen = sum(1 for _ in stdlib_documents(train_bytes))
    stream = bytearray()
    need = num_sequences * (seq_length + 1)
    for i, doc in enumerate(stdlib_documents(1 << 40)):
        if i < seen:
            continue
        stream += doc + bytes([EOD])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"the standard library holds {len(stream)} held-out bytes after the first "
                         f"{train_bytes}; {num_sequences} sequences of {seq_length} need {need}")
    windows = torch.tensor(list(stream[:need]), dtype=torch.long).view(num_sequences, -1)
    return windows_to_batches(windows, batch_size)


def windows_to_batches(windows: torch.Tensor, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """[N, seq_length + 1] token windows -> LM batches of up to `batch_size` (every token counts)."""
    batches = []
    for rows in torch.split(windows, batch_size):
        b, s = rows.shape[0], rows.shape[1] - 1
        batches.append({"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                        "position_ids": torch.arange(s).expand(b, s).contiguous(),
                        "loss_mask": torch.ones(b, s)})
    return batches


@torch.no_grad()
def heldout_loss(model, batches: Sequence[Dict[str, torch.Tensor]]) -> float:
    """Mean LM loss per token of `model` over `batches` (eval mode, no MTP bookkeeping)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for batch in batches:
        b = {k: v.to(device) for k, v in batch.items()}
        per_token = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        mask = b["loss_mask"].float()
        total += (per_token.float() * mask).sum().item()
        count += mask.sum().item()
    return total / count
