"""The pure HF <-> ours mapping: it names exactly the model's tensors, regions read like slices of
the whole, split inverts read, and the RoPE permutation turns rotate-half into interleaved pairs."""

import pytest
import torch

from megatron_dsv3.checkpoint.hf_model import local_shards
from megatron_dsv3.checkpoint.mapping import Experts, model_maps, rope_rows_perm, tp_chunks
from megatron_dsv3.configs import get_config
from megatron_dsv3.model import build_model

CONFIGS = {
    "tiny": {},
    "no_q_lora_two_mtp": dict(q_lora_rank=None, mtp_num_layers=2, first_k_dense_replace=0),
    "all_dense_but_one": dict(num_layers=3, first_k_dense_replace=2, mtp_num_layers=None,
                              moe_shared_expert_intermediate_size=None),
    "bf16": dict(bf16=True),
}


class DictSource:
    """HF tensors held in a dict; records what was read."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, []

    def has(self, name):
        return name in self.tensors

    def read(self, name, region):
        self.reads.append((name, region))
        return self.tensors[name][region]


def random_hf(maps):
    return {t.name: torch.randn(t.shape) for m in maps.values() for t in m.hf_tensors()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_maps_name_every_model_tensor_with_its_global_shape_and_a_lossless_dtype(name, single_rank_world):
    config = get_config("deepseek-v3-tiny", **CONFIGS[name])
    model = build_model(config)
    shards = {sh.key: sh for sh in local_shards(model)}
    maps = model_maps(config)
    assert set(shards) == set(maps)
    for key, sh in shards.items():
        assert tuple(sh.global_shape) == tuple(maps[key].shape), key
        stored = maps[key].dtype_override or config.params_dtype
        # what a conversion stores holds the model's values exactly
        assert stored in (sh.data.dtype, torch.float32), key
        assert maps[key].dtype_override or sh.data.dtype == config.params_dtype, key
    hf_names = [t.name for m in maps.values() for t in m.hf_tensors()]
    assert len(hf_names) == len(set(hf_names))  # each HF tensor feeds one of ours


@pytest.mark.parametrize("interleave", [True, False])
def test_region_reads_equal_slices_of_the_full_tensor_and_split_inverts_read(interleave):
    config = get_config("deepseek-v3-tiny", q_lora_rank=None)
    maps = model_maps(config, rope_interleave=interleave)
    src = DictSource(random_hf(maps))
    gen = torch.Generator().manual_seed(0)
    for key, m in maps.items():
        full = m.read(src, tuple(slice(0, n) for n in m.shape))
        assert tuple(full.shape) == tuple(m.shape)
        assert dict(m.split(full)) .keys() == {t.name for t in m.hf_tensors()}
        for name, t in m.split(full):
            assert torch.equal(t, src.tensors[name]), name
        for _ in range(3):  # random rectangular regions
            bounds = [sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist()) for n in m.shape]
            region = tuple(slice(a, b if b > a else a + 1) for a, b in bounds)
            if any(s.stop > n for s, n in zip(region, m.shape)):
                continue
            assert torch.equal(m.read(src, region), full[region]), (key, region)


def test_experts_read_only_the_experts_asked_for():
    config = get_config("deepseek-v3-tiny")
    maps = model_maps(config)
    src = DictSource(random_hf(maps))
    m = maps["decoder.layers.1.mlp.experts.fc1_weight"]
    part = m.read(src, (slice(4, 8), slice(0, 64), slice(0, 64)))
    assert part.shape == (4, 64, 64)
    assert {name.split(".")[5] for name, _ in src.reads} == {"4", "5", "6", "7"}
    for i, e in enumerate(range(4, 8)):
        gate = src.tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]
        up = src.tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]
        assert torch.equal(part[i], torch.cat([gate, up]))
    names = [n for n, _ in m.split(part, start=4)]
    assert names[:2] == ["model.layers.1.mlp.experts.4.gate_proj.weight",
                         "model.layers.1.mlp.experts.4.up_proj.weight"]


def test_rope_permutation_turns_rotate_half_into_interleaved_pairs():
    """q.k with HF's rotate-half RoPE on rows r equals q.k with interleaved RoPE on rows perm(r)."""
    from megatron_dsv3.attention.rope import apply_rotary

    d, pos = 8, torch.tensor([3.0, 11.0])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = pos[:, None] * inv_freq  # [2, d/2]
    q, k = torch.randn(1, d), torch.randn(1, d)  # a query at position 3, a key at position 11

    def rotate_half(x, f):
        cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    perm = rope_rows_perm(1, d, 0, d)
    hf_dot = (rotate_half(q, freqs[:1]) * rotate_half(k, freqs[1:])).sum()
    ours_dot = (apply_rotary(q[:, perm], freqs[:1].cos(), freqs[:1].sin())
                * apply_rotary(k[:, perm], freqs[1:].cos(), freqs[1:].sin())).sum()
    assert torch.allclose(hf_dot, ours_dot, atol=1e-6)
    unpermuted = (apply_rotary(q, freqs[:1].cos(), freqs[:1].sin())
                  * apply_rotary(k, freqs[1:].cos(), freqs[1:].sin())).sum()
    assert not torch.allclose(hf_dot, unpermuted, atol=1e-3)  # the permutation is needed
    # per head, only the RoPE rows move
    p = rope_rows_perm(2, 5 + 4, 5, 4)
    assert p.tolist() == [0, 1, 2, 3, 4, 5, 7, 6, 8, 9, 10, 11, 12, 13, 14, 16, 15, 17]


def test_tp_chunks_tile_each_tensor_exactly_once():
    config = get_config("deepseek-v3-tiny")
    for tp in (1, 2, 4):
        for key, m in model_maps(config).items():
            covered = torch.zeros(m.shape, dtype=torch.int32)
            for offset, shape in tp_chunks(m, tp):
                covered[tuple(slice(o, o + n) for o, n in zip(offset, shape))] += 1
            assert bool((covered == 1).all()), (key, tp)
            if isinstance(m, Experts):
                assert len(tp_chunks(m, tp)) == config.num_moe_experts
