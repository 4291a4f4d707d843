"""The trainer's dataset cache: a Megatron GPTDataset index torn by a kill while it was written is
built again instead of failing every later start."""

import os

import numpy

from megatron_dsv3.training.data import build_indexed_corpus, build_train_dataset


def test_a_torn_dataset_index_is_built_again(tmp_path):
    cache = str(tmp_path / "cache")
    prefix = build_indexed_corpus(cache, max_bytes=1 << 16, log=lambda *_: None)
    first = build_train_dataset(prefix, 32, 40, 1234, cache, log=lambda *_: None)
    samples = [first[i]["tokens"].tolist() for i in range(5)]
    index = [n for n in os.listdir(cache) if n.endswith("shuffle_index.npy")]
    assert len(index) == 1
    path = os.path.join(cache, index[0])
    with open(path, "r+b") as f:  # numpy.save killed half way
        f.truncate(os.path.getsize(path) // 2)
    messages = []
    again = build_train_dataset(prefix, 32, 40, 1234, cache, log=messages.append)
    assert [again[i]["tokens"].tolist() for i in range(5)] == samples
    assert len(messages) == 1 and index[0] in messages[0]
    numpy.load(path, mmap_mode="r")  # whole again
