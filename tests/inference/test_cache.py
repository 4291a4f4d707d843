"""The latent cache: 576 values per token per layer for DeepSeek-V3, block tables, free list."""

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.inference.cache import CacheFull, LatentCache, latent_width


def test_cache_holds_kv_lora_rank_plus_rope_dim_values_per_token_per_layer():
    config = get_config("deepseek-v3", perform_initialization=False, use_cpu_initialization=True)
    assert config.kv_lora_rank + config.qk_pos_emb_head_dim == 576
    cache = LatentCache.for_config(config, num_blocks=2, block_size=4)
    assert latent_width(config) == cache.values_per_token_per_layer == 576
    # 61 decoder layers + 1 MTP layer, BF16: 576 * 2 bytes each
    assert cache.num_layers == 62 and cache.data.dtype == torch.bfloat16
    assert cache.bytes_per_token == 62 * 576 * 2
    # the 61 decoder layers alone: the report's 70,272 bytes per token
    assert 61 * 576 * 2 == 70272
    # against a standard multi-head KV cache: 128 heads x (192 key + 128 value) values
    mha = config.num_attention_heads * (config.qk_head_dim + config.qk_pos_emb_head_dim
                                        + config.v_head_dim)
    assert mha / 576 == pytest.approx(71.1, abs=0.05)


def test_block_table_free_list_truncate_and_release():
    cache = LatentCache(num_layers=2, kv_lora_rank=3, rope_dim=2, num_blocks=5, block_size=4)
    cache.ensure("a", 6)                       # 2 blocks
    cache.ensure("b", 4)                       # 1 block
    assert cache.num_free_blocks == 2
    assert len(set(cache.tables["a"]) | set(cache.tables["b"])) == 3
    cache.ensure("a", 8)                       # still 2 blocks
    assert len(cache.tables["a"]) == 2
    cache.ensure("a", 9)                       # a third one
    assert len(cache.tables["a"]) == 3 and cache.num_free_blocks == 1
    with pytest.raises(CacheFull, match="free"):
        cache.ensure("b", 13)                  # needs 3 more, 1 free
    cache.truncate("a", 8)                     # position 8 rolled back: its block is freed
    assert len(cache.tables["a"]) == 2 and cache.num_free_blocks == 2
    cache.release("a")
    cache.release("b")
    assert cache.num_free_blocks == 5 and sorted(cache.free) == list(range(5))
    assert cache.tables == {}


def test_written_latents_are_read_back_at_their_positions():
    cache = LatentCache(num_layers=2, kv_lora_rank=3, rope_dim=2, num_blocks=8, block_size=2)
    lengths = {"a": 5, "b": 3}
    values = {}
    for r, n in lengths.items():
        cache.ensure(r, n)
        values[r] = torch.randn(n, 5)
        cache.write(1, torch.tensor(cache.slots(r, range(n))), values[r][:, :3], values[r][:, 3:])
    # blocks of the two requests interleave in storage; reads follow each block table
    index = cache.gather_index(["b", "a"], [3, 5])
    c_kv, k_rope = cache.read(1, index)
    assert c_kv.shape == (2, 5, 3) and k_rope.shape == (2, 5, 2)
    torch.testing.assert_close(torch.cat([c_kv[1], k_rope[1]], -1), values["a"])
    torch.testing.assert_close(torch.cat([c_kv[0, :3], k_rope[0, :3]], -1), values["b"])
    assert cache.data[0].abs().sum() == 0      # layer 0 untouched
