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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, Sequence, Tuple

import torch

from megatron_dsv3.dispatch.topology import current_lane
from megatron_dsv3.inference.cache import LatentCache
from megatron_dsv3.pipeline.overlap import StepTrace


@dataclass
class Chunk:
    """New tokens of one request in a forward: tokens[j] sits at position start + j."""

    request: Hashable
    tokens: List[int]
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


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
    def _layout(self, chunks: Sequence[Chunk]):
        """tokens [b, s], positions [b, s], valid [b, s], flat cache slots of the valid tokens
        (row-major), gather index [b, T] and key mask [b, T] of every request's keys."""
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
        dev = self.device
        return (tokens.to(dev), positions.to(dev), valid.to(dev),
                torch.tensor(slots, dtype=torch.long, device=dev), index, key_mask.to(dev))

    def _run_layers(self, layers, first_cache_layer: int, hidden, positions, valid, slots, index,
                    key_mask):
        lane = current_lane()  # the micro-batch, in a two-micro-batch decode step
        for j, layer in enumerate(layers):
            cache_layer = first_cache_layer + j
            attn = layer.self_attention
            with StepTrace.op("attn", cache_layer, lane, lane, True):    # timeline, when traced
                x = layer.input_layernorm(hidden)                            # [s, b, h]
                c_kv, k_rope = attn.latents(x, positions)                    # [b, s, c], [b, s, dr]
                self.cache.write(cache_layer, slots, c_kv[valid], k_rope[valid])
                cache_c_kv, cache_k_rope = self.cache.read(cache_layer, index)  # [b, T, c], [b, T, dr]
                attend = attn.forward_absorbed if self.absorbed else attn.forward_expanded
                out, bias = attend(x, positions, cache_c_kv, cache_k_rope, key_mask=key_mask)
                hidden = hidden + (out if bias is None else out + bias)
            hidden = layer.forward_mlp(hidden)
        return hidden

    def _logits(self, hidden):
        logits, _ = self.model.output_layer(hidden)                          # [s, b, V]
        return logits.transpose(0, 1).float()

    # -- forwards ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, chunks: Sequence[Chunk]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Main model over the chunks' new tokens, writing their latents into the cache.
        -> (logits [b, s, V] float32, final-normed hidden states [b, s, h]); rows past a chunk's
        length are padding."""
        tokens, positions, valid, slots, index, key_mask = self._layout(chunks)
        hidden = self.model.embedding(input_ids=tokens, position_ids=positions)   # [s, b, h]
        hidden = self._run_layers(self.layers, 0, hidden, positions, valid, slots, index, key_mask)
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
        mtp = self.mtp_layer
        tokens, positions, valid, slots, index, key_mask = self._layout(chunks)
        emb = self.model.embedding(input_ids=tokens, position_ids=positions)      # [s, b, h]
        h = main_hidden[:, : tokens.shape[1]].transpose(0, 1).to(emb.dtype)
        x, _ = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(h)], dim=-1))
        x = self._run_layers([mtp.transformer_layer], len(self.layers), x, positions, valid, slots,
                             index, key_mask)
        return self._logits(mtp.final_layernorm(x))
