"""A corpus present on every machine — the Python standard library's source (megatron_dsv3.corpus) —
as byte-level tokens in Megatron's indexed-dataset format, read through Megatron's own GPTDataset.

Bytes 1..254 are text (valid UTF-8 never contains 0x00 or 0xFF); 0 is end-of-document, 255 pad.
"""

from __future__ import annotations

import hashlib
import os

import numpy
import torch

from megatron_dsv3.corpus import stdlib_documents
from megatron_dsv3.tokenizer import EOD, ByteTokenizer


def build_indexed_corpus(cache_dir: str, max_bytes: int = 8 << 20, log=print) -> str:
    """Write the corpus as <prefix>.bin/.idx once (cached by content); return the path prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(cache_dir, exist_ok=True)
    docs = list(stdlib_documents(max_bytes))
    digest = hashlib.sha1(b"".join(hashlib.sha1(d).digest() for d in docs)).hexdigest()[:12]
    prefix = os.path.join(cache_dir, f"stdlib_bytes_{digest}")
    if os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin"):
        return prefix
    log(f"building byte-level corpus from {len(docs)} stdlib files "
        f"({sum(map(len, docs)) / 2**20:.1f} MiB) -> {prefix}.bin/.idx")
    tmp = prefix + f".tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=numpy.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(numpy.frombuffer(doc + bytes([EOD]), dtype=numpy.uint8)
                                          .astype(numpy.int64)))
        builder.end_document()
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return prefix


def drop_torn_index_files(cache_dir: str, log=print) -> list:
    """Megatron's GPTDataset writes its index arrays into `path_to_cache` with plain numpy.save
    and takes "the files exist" for a cache hit, so a kill while one is written leaves a torn
    .npy that every later start fails on. Remove each dataset's cached files (those sharing its
    hash prefix) when one of its arrays does not read back whole; Megatron then builds them
    again. -> the names removed."""
    if not os.path.isdir(cache_dir):
        return []
    names = sorted(os.listdir(cache_dir))
    torn = set()
    for name in names:
        if name.endswith(".npy"):
            try:
                numpy.load(os.path.join(cache_dir, name), mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError):
                torn.add(name.split("-", 1)[0])
    removed = [n for n in names if n.split("-", 1)[0] in torn and "-" in n]
    for name in removed:
        os.remove(os.path.join(cache_dir, name))
    if removed:
        log(f"removed a dataset index an interrupted build left incomplete in {cache_dir} "
            f"({', '.join(removed)}); building it again")
    return removed


def build_train_dataset(prefix: str, seq_length: int, num_samples: int, seed: int, cache_dir: str,
                        log=print):
    """Megatron's GPTDataset over the corpus (all documents in the training split)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        drop_torn_index_files(cache_dir, log)  # (the other ranks read the cache after rank 0)

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
        path_to_cache=cache_dir, tokenizer=ByteTokenizer(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train
