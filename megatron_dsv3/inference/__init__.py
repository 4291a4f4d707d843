"""Inference the DeepSeek-V3 way: absorbed-MLA decoding over a latent cache in fixed-size blocks,
batched requests, greedy and sampled decoding, streaming, and MTP speculative decoding.

    from megatron_dsv3.inference import InferenceEngine, Request, SamplingParams
    engine = InferenceEngine(model, block_size=16, decode=tokenizer_decode)
    results = engine.generate([Request(ids, max_new_tokens=64)], speculative=True)

`cache` (block table, free list, [c_kv | k_rope] per token and layer), `decoder` (the model's
layers' cached entry points strung over the cache), `sampling` (token choice, log-probabilities),
`engine` (requests, steps, stop conditions, streaming, a public step API),
`speculative` (MTP draft, main-model verification, roll-back), `loading` (checkpoints and
tokenizers for the command line `python -m megatron_dsv3.generate`), `parallel` (attention
data-parallel, experts expert-parallel: engines in lockstep; `micro_batches=2` overlaps one
micro-batch's all-to-alls with the other's computation), `disaggregated` (prefill ranks hand latent
caches to decode ranks; a mixed-load request generator). Redundant experts: megatron_dsv3.moe.eplb.
"""

from megatron_dsv3.inference.cache import CacheFull, LatentCache, latent_width
from megatron_dsv3.inference.decoder import Chunk, LatentDecoder, LayerCacheView
from megatron_dsv3.inference.engine import (
    Completion,
    GenerationStats,
    InferenceEngine,
    Request,
    RequestState,
    TokenEvent,
)
from megatron_dsv3.inference.sampling import (
    Sampled,
    SamplingParams,
    filtered_logits,
    sample_next,
    with_logprobs,
)

__all__ = ["CacheFull", "LatentCache", "latent_width", "Chunk", "LatentDecoder", "LayerCacheView",
           "Completion", "GenerationStats", "InferenceEngine", "Request", "RequestState",
           "TokenEvent", "Sampled", "SamplingParams", "filtered_logits", "sample_next",
           "with_logprobs"]
