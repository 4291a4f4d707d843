"""The MLA latent cache, allocated in fixed-size blocks.

With W_UK and W_UV absorbed (attention/mla.py `forward_absorbed`), a token's keys and values for
every head are recovered from two vectors, so each layer caches per token only

    [c_kv | k_rope]      kv_lora_rank + qk_pos_emb_head_dim values   (512 + 64 = 576 for V3)

Storage is one tensor [layers, num_blocks, block_size, kv_lora_rank + dr]. A request owns a
*block table* (the list of its blocks, position p living in block table[p // block_size] at
offset p % block_size) and draws blocks from a *free list*; truncating a request (rolled-back
speculative positions) or releasing it (finished) returns its blocks to the free list. Attention
reads a request's keys by gathering its slots into a dense [b, T, ...] batch (`gather_index`).
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Sequence

import torch


def latent_width(config) -> int:
    """Values cached per token per layer: kv_lora_rank + qk_pos_emb_head_dim (576 for V3)."""
    return config.kv_lora_rank + config.qk_pos_emb_head_dim


class CacheFull(RuntimeError):
    """No free block is left for a request's next position."""


def blocks_for(num_positions: int, block_size: int) -> int:
    """Blocks of `block_size` positions that hold `num_positions` positions."""
    return -(-num_positions // block_size)


class LatentCache:
    def __init__(self, num_layers: int, kv_lora_rank: int, rope_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype = torch.float32, device=None):
        if block_size <= 0 or num_blocks <= 0:
            raise ValueError(f"block_size={block_size}, num_blocks={num_blocks}: both must be "
                             "positive integers")
        self.num_layers, self.kv_lora_rank, self.rope_dim = num_layers, kv_lora_rank, rope_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        # [layers, blocks, block_size, c + dr]: c_kv then k_rope (after RoPE) of each token
        self.data = torch.zeros(num_layers, num_blocks, block_size, kv_lora_rank + rope_dim,
                                dtype=dtype, device=device)
        self.free: List[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.tables: Dict[Hashable, List[int]] = {}

    @classmethod
    def for_config(cls, config, num_blocks: int, block_size: int, *, num_layers: int = None,
                   dtype: torch.dtype = None, device=None) -> "LatentCache":
        """A cache for `config`'s decoder layers plus its MTP layers (unless num_layers given)."""
        if num_layers is None:
            num_layers = config.num_layers + (config.mtp_num_layers or 0)
        return cls(num_layers, config.kv_lora_rank, config.qk_pos_emb_head_dim, num_blocks,
                   block_size, dtype=dtype or config.params_dtype, device=device)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def values_per_token_per_layer(self) -> int:
        return self.data.shape[-1]

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all cached layers."""
        return self.num_layers * self.values_per_token_per_layer * self.data.element_size()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_positions: int) -> int:
        return blocks_for(num_positions, self.block_size)

    def capacity(self, request: Hashable) -> int:
        """Positions the request's blocks hold."""
        return len(self.tables.get(request, ())) * self.block_size

    # -- block table / free list --------------------------------------------------------------
    def ensure(self, request: Hashable, num_positions: int) -> None:
        """Give `request` blocks for positions [0, num_positions)."""
        table = self.tables.setdefault(request, [])
        need = self.blocks_for(num_positions) - len(table)
        if need > len(self.free):
            raise CacheFull(f"request {request!r} needs {need} more blocks of {self.block_size} "
                            f"positions; {len(self.free)} of {self.num_blocks} are free")
        for _ in range(max(need, 0)):
            table.append(self.free.pop())

    def truncate(self, request: Hashable, num_positions: int) -> None:
        """Keep positions [0, num_positions) of `request`; blocks past them go back to the free
        list (what a rejected speculative position leaves behind is simply overwritten later)."""
        table = self.tables.get(request, [])
        keep = self.blocks_for(num_positions)
        while len(table) > keep:
            self.free.append(table.pop())

    def release(self, request: Hashable) -> None:
        """Return all of a finished request's blocks to the free list."""
        self.truncate(request, 0)
        self.tables.pop(request, None)

    # -- slots -------------------------------------------------------------------------------
    def slots(self, request: Hashable, positions: Sequence[int]) -> List[int]:
        """Flat slot index (block * block_size + offset) of each position of `request`."""
        table, bs = self.tables[request], self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def gather_index(self, requests: Sequence[Hashable], lengths: Sequence[int]) -> torch.Tensor:
        """[b, T] flat slots of positions 0..T-1 of each request (T = max length); positions a
        request does not have point at slot 0 and must be masked by the caller."""
        T, bs = max(lengths), self.block_size
        blocks = torch.zeros(len(requests), self.blocks_for(T), dtype=torch.long)
        for i, r in enumerate(requests):
            table = self.tables[r][: self.blocks_for(lengths[i])]
            blocks[i, : len(table)] = torch.tensor(table, dtype=torch.long)
        p = torch.arange(T)
        index = blocks[:, p // bs] * bs + p % bs                        # [b, T]
        index = index.masked_fill(p[None, :] >= torch.tensor(lengths)[:, None], 0)
        return index.to(self.data.device)

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Store latents [n, c] and [n, dr] of n tokens at flat `slots` [n] of `layer`."""
        flat = self.data[layer].view(-1, self.values_per_token_per_layer)
        flat[slots] = torch.cat([c_kv, k_rope], dim=-1).to(flat.dtype)

    def read(self, layer: int, index: torch.Tensor):
        """(c_kv [b, T, c], k_rope [b, T, dr]) at the slots `index` [b, T] of `layer`."""
        flat = self.data[layer].view(-1, self.values_per_token_per_layer)
        kv = flat[index]
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank:]

    # -- hand-off (prefill/decode separation) -------------------------------------------------
    def export(self, request: Hashable, num_positions: int) -> torch.Tensor:
        """[layers, num_positions, c + dr]: the request's latents of every layer, positions
        0..num_positions-1, as one dense tensor to send to another rank."""
        return self._per_layer()[:, self._first_slots(request, num_positions)]

    def adopt(self, request: Hashable, latents: torch.Tensor) -> None:
        """Take blocks for `request` and store `latents` [layers, n, c + dr] (from `export`) at
        its positions 0..n-1."""
        layers, n, width = latents.shape
        if (layers, width) != (self.num_layers, self.values_per_token_per_layer):
            raise ValueError(f"latents for {layers} layers x {width} values; this cache holds "
                             f"{self.num_layers} x {self.values_per_token_per_layer}")
        self.ensure(request, n)
        self._per_layer()[:, self._first_slots(request, n)] = latents.to(self.data.dtype)

    def _per_layer(self) -> torch.Tensor:
        """[layers, all slots, c + dr] view of the storage."""
        return self.data.view(self.num_layers, -1, self.values_per_token_per_layer)

    def _first_slots(self, request: Hashable, n: int) -> torch.Tensor:
        return torch.tensor(self.slots(request, range(n)), dtype=torch.long,
                            device=self.data.device)
