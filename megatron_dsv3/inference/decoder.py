"""DeepSeekV3Model's layers run over the latent cache (absorbed MLA), for any batch of requests.

One forward takes, per request, a run of new tokens starting at the request's own position:
    x = Emb(tokens)                                                     [s, b, h]
    per layer:  n = RMSNorm(x);  [c_kv | k_rope] of the new tokens -> cache
                x = x + MLA_absorbed(n, cache of this request, keys <= own position)
                x = x + FFN(RMSNorm(x))                                  (dense MLP or MoE)
    h = RMSNorm_final(x);  logits = W_out h
and the MTP module (depth 1) the same way over its own cache layer:
    h'_i = eh_proj([RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]),  one layer,  RMSNorm,  W_out.
Requests in one forward may have different numbers of new tokens (padded; padded slots write
nothing and their outputs are dropped) and different cached lengths (keys masked per request).

The per-layer computation is the model's own: DeepSeekV3TransformerLayer.forward_cached and
MTPLayer.forward_cached, each handed a `LayerCacheView` of its cache layer for the batch; this
module only lays the batch out over the cache and strings the layers together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, List, Sequence, Tuple

import torch

from megatron_dsv3.inference.cache import LatentCache
from megatron_dsv3.lanes import StepTrace, current_lane


@dataclass
class Chunk:
    """New tokens of one request in a forward: tokens[j] sits at position start + j."""

    request: Hashable
    tokens: List[int]
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class LayerCacheView:
    """One cache layer as a batched forward sees it: what a layer's `forward_cached` writes its
    new tokens' latents into and reads every key from."""

    cache: LatentCache
    layer: int                # the cache layer (decoder layers first, then the MTP layers)
    slots: torch.Tensor       # [n] flat slots of the batch's real new tokens, row-major
    valid: torch.Tensor       # [b, s] True for a real new token, False for padding
    index: torch.Tensor       # [b, T] flat slots of every request's keys
    key_mask: torch.Tensor    # [b, T] True where the request has that key
    lane: int = 0             # the micro-batch, in a two-micro-batch decode step

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Store c_kv [b, s, c] and k_rope [b, s, dr] of the real new tokens (padding writes
        nothing) -> every key's (c_kv [b, T, c], k_rope [b, T, dr], key_mask [b, T])."""
        self.cache.write(self.layer, self.slots, c_kv[self.valid], k_rope[self.valid])
        cache_c_kv, cache_k_rope = self.cache.read(self.layer, self.index)
        return cache_c_kv, cache_k_rope, self.key_mask

    def attention_span(self):
        """The attention half as an "attn" op of the step's timeline (when one is recorded)."""
        return StepTrace.op("attn", self.layer, self.lane, self.lane, True)


class LatentDecoder:
    def __init__(self, model, cache: LatentCache, absorbed: bool = True):
        """`absorbed=False` reads the same cache through the un-absorbed formula (latents
        expanded into per-head keys and values every step): for comparison only."""
        self.model, self.cache, self.absorbed = model, cache, absorbed
        self.layers = list(model.decoder.layers)
        mtp = getattr(model, "mtp", None)
        self.mtp_layer = mtp.layers[0] if mtp is not None and len(mtp.layers) else None
        needed = len(self.layers) + (self.mtp_layer is not None)
        if cache.num_layers < needed:
            raise ValueError(f"the cache holds {cache.num_layers} layers; the model needs {needed} "
                             f"({len(self.layers)} decoder layers"
                             f"{' + 1 MTP layer' if self.mtp_layer is not None else ''})")
        self.device = model.embedding.word_embeddings.weight.device

    # -- batch layout -----------------------------------------------------------------------
    def _layout(self, chunks: Sequence[Chunk]
                ) -> Tuple[torch.Tensor, torch.Tensor, Callable[[int], LayerCacheView]]:
        """tokens [b, s], positions [b, s], and the view of a cache layer for this batch (blocks
        for the chunks' positions are taken here)."""
        s = max(len(c.tokens) for c in chunks)
        tokens = torch.zeros(len(chunks), s, dtype=torch.long)
        positions = torch.zeros(len(chunks), s, dtype=torch.long)
        valid = torch.zeros(len(chunks), s, dtype=torch.bool)
        slots = []
        for i, c in enumerate(chunks):
            n = len(c.tokens)
            self.cache.ensure(c.request, c.end)
            tokens[i, :n] = torch.tensor(c.tokens, dtype=torch.long)
            # a padded query repeats the last real position: it reads valid keys, then is dropped
            positions[i] = torch.arange(c.start, c.start + s).clamp_max(c.end - 1)
            valid[i, :n] = True
            slots += self.cache.slots(c.request, range(c.start, c.end))
        lengths = [c.end for c in chunks]
        index = self.cache.gather_index([c.request for c in chunks], lengths)
        key_mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        dev, lane = self.device, current_lane()
        slots = torch.tensor(slots, dtype=torch.long, device=dev)
        valid, key_mask = valid.to(dev), key_mask.to(dev)

        def view(layer: int) -> LayerCacheView:
            return LayerCacheView(self.cache, layer, slots, valid, index, key_mask, lane)

        return tokens.to(dev), positions.to(dev), view

    def _logits(self, hidden):
        logits, _ = self.model.output_layer(hidden)                          # [s, b, V]
        return logits.transpose(0, 1).float()

    # -- forwards ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, chunks: Sequence[Chunk]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Main model over the chunks' new tokens, writing their latents into the cache.
        -> (logits [b, s, V] float32, final-normed hidden states [b, s, h]); rows past a chunk's
        length are padding."""
        tokens, positions, view = self._layout(chunks)
        hidden = self.model.embedding(input_ids=tokens, position_ids=positions)   # [s, b, h]
        for j, layer in enumerate(self.layers):
            hidden = layer.forward_cached(hidden, view(j), positions, absorbed=self.absorbed)
        hidden = self.model.decoder.final_layernorm(hidden)
        return self._logits(hidden), hidden.transpose(0, 1)

    @torch.no_grad()
    def idle(self, mtp: bool = False) -> None:
        """A forward without tokens: every FFN (main layers, then the MTP layer if `mtp`) runs on
        zero tokens, so that this rank's MoE layers take part in the expert-parallel all-to-alls
        of a step in which it has nothing to compute (megatron_dsv3.inference.parallel)."""
        config = self.model.config
        x = torch.zeros(0, 1, config.hidden_size, dtype=config.params_dtype, device=self.device)
        layers = self.layers + ([self.mtp_layer.transformer_layer] if mtp and self.mtp_layer else [])
        for layer in layers:
            layer.forward_mlp(x)

    @torch.no_grad()
    def forward_mtp(self, chunks: Sequence[Chunk], main_hidden: torch.Tensor) -> torch.Tensor:
        """MTP depth 1 at positions i = chunk.start.. with chunk.tokens = t_{i+1} and
        main_hidden [b, s, h] = the main model's final-normed h_i. -> logits [b, s, V] for
        t_{i+2}."""
        if self.mtp_layer is None:
            raise ValueError("the model has no MTP module (mtp_num_layers is None)")
        tokens, positions, view = self._layout(chunks)
        emb = self.model.embedding(input_ids=tokens, position_ids=positions)      # [s, b, h]
        h = main_hidden[:, : tokens.shape[1]].transpose(0, 1).to(emb.dtype)
        x = self.mtp_layer.forward_cached(emb, h, view(len(self.layers)), positions,
                                          absorbed=self.absorbed)
        return self._logits(x)
