"""MTP speculative decoding (DeepSeek-V3 section 5.4.3), greedy, depth 1.

State of a request after each step: the cache holds positions 0..n-1 (main layers and the MTP
layer alike); `pending` = t_n, the last accepted token, not yet in the cache; `draft` = the MTP
module's guess of t_{n+1}, made from h_{n-1} and Emb(t_n).

One step, all running requests together:
    main model on [t_n, draft] at positions [n, n+1]  ->  g1 = argmax at n, g2 = argmax at n+1
    g1 == draft (accepted):  emit g1, g2; the cache keeps n and n+1;
                             MTP at positions n, n+1 with (h_n, g1), (h_{n+1}, g2) -> next draft
    otherwise (rejected):    emit g1; position n+1 is rolled back (its blocks freed, its slot
                             overwritten later); MTP at position n with (h_n, g1) -> next draft
Every emitted token is the main model's argmax given accepted tokens only, so the output equals
plain greedy decoding; an accepted draft yields two tokens for one main-model forward. Each
emitted token's log-probability is read from the verifying forward's logits at its position.
"""

from __future__ import annotations

from typing import List

import torch

from megatron_dsv3.inference.decoder import Chunk, LatentDecoder
from megatron_dsv3.inference.sampling import Sampled, check_finite_logits, with_logprobs


def speculative_step(decoder: LatentDecoder, running: List, stats,
                     step: str = "decode step") -> List[Sampled]:
    """One verify-and-draft step over the running requests (engine.RequestState objects); returns
    the tokens each produced (before stop conditions) with their log-probabilities and counts
    forwards and drafts in `stats`.
    Non-finite main-model logits raise NonFiniteLogitsError naming `step`, request and position."""
    active = [st for st in running if not st.finish_reason]
    if not active:
        return [Sampled() for _ in running]
    logits, hidden = decoder.forward([Chunk(st.key, [st.pending, st.draft], st.length)
                                      for st in active])
    check_finite_logits(logits, [st.index for st in active], [st.length for st in active], step)
    greedy = torch.argmax(logits, dim=-1).tolist()                   # [b, 2]
    produced, mtp_chunks = {}, []
    for i, st in enumerate(active):
        n = st.length
        g1, g2 = greedy[i]
        accepted = g1 == st.draft
        new = [g1, g2] if accepted else [g1]
        st.length = n + len(new)
        decoder.cache.truncate(st.key, st.length)                  # roll back a rejection
        mtp_chunks.append(Chunk(st.key, new, n))
        produced[st.key] = with_logprobs(logits[i, : len(new)], new, st.request.sampling.logprobs)
        stats.forwards += 1
        stats.drafted += 1
        stats.accepted += int(accepted)
    # MTP over the positions that just became final: h_n (and h_{n+1}) with the next tokens
    mtp_logits = decoder.forward_mtp(mtp_chunks, hidden)
    for i, (st, c) in enumerate(zip(active, mtp_chunks)):
        st.draft = int(torch.argmax(mtp_logits[i, len(c.tokens) - 1]))
    return [produced.get(st.key, Sampled()) for st in running]
