"""Decoding over the latent cache against the model's own full-sequence forward.

The reference is DeepSeekV3Model.forward (Megatron's GPTModel path: training-form MLA with
up-projected keys and values, causal attention over the whole sequence) re-run on the full token
sequence; the engine runs the layers itself with absorbed MLA over blocks of cached latents.
"""

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.inference import Chunk, InferenceEngine, LatentCache, LatentDecoder, Request
from megatron_dsv3.inference import SamplingParams
from megatron_dsv3.model import build_model
from megatron_dsv3.tokenizer import ByteTokenizer

from logprobs_reference import assert_logprobs_match

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model(single_rank_world):
    torch.manual_seed(0)
    # the tiny preset with larger weights so that logits are far from uniform
    return build_model(get_config("deepseek-v3-tiny", init_method_std=0.2)).eval()


def full_logits(model, tokens):
    """[len, V] logits of the model's full forward on one sequence."""
    with torch.no_grad():
        ids = torch.tensor([tokens])
        return model(ids, torch.arange(len(tokens))[None], None)[0].float()


def greedy_by_rerun(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def random_tokens(n, seed):
    return torch.randint(1, 255, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cached_decode_gives_the_full_forward_logits_at_every_step(model):
    # four requests: prompt lengths 3, 7, 1, 10 decoding to lengths 14, 12, 10, 17, together
    specs = [(3, 14), (7, 12), (1, 10), (10, 17)]
    seqs = [random_tokens(total, seed) for seed, (_, total) in enumerate(specs)]
    cache = LatentCache.for_config(model.config, num_blocks=40, block_size=3)
    decoder = LatentDecoder(model, cache)
    reference = [full_logits(model, s) for s in seqs]
    for r, (prompt_len, _) in enumerate(specs):
        logits, _ = decoder.forward([Chunk(r, seqs[r][:prompt_len], 0)])
        torch.testing.assert_close(logits[0], reference[r][:prompt_len], **TOL)
    lengths = [p for p, _ in specs]
    steps = 0
    while any(n < len(s) for n, s in zip(lengths, seqs)):
        active = [r for r in range(len(seqs)) if lengths[r] < len(seqs[r])]
        logits, _ = decoder.forward([Chunk(r, [seqs[r][lengths[r]]], lengths[r]) for r in active])
        for i, r in enumerate(active):
            torch.testing.assert_close(logits[i, 0], reference[r][lengths[r]], **TOL)
            lengths[r] += 1
        steps += 1
    assert steps == 11
    # every request spans several blocks, and the blocks of different requests interleave
    assert [len(cache.tables[r]) for r in range(4)] == [5, 4, 4, 6]
    assert sorted(b for t in cache.tables.values() for b in t) == list(range(19))


def test_mtp_over_the_cache_equals_megatrons_mtp_block_on_the_full_sequence(model):
    tokens = random_tokens(13, 5)
    ids, pos = torch.tensor([tokens]), torch.arange(13)[None]
    with torch.no_grad():
        hidden = model.decoder(hidden_states=model.embedding(input_ids=ids, position_ids=pos),
                               attention_mask=None)
        both = model.mtp(input_ids=ids, position_ids=pos, hidden_states=hidden,
                         attention_mask=None, embedding=model.embedding)
        mtp_hidden = torch.chunk(both, 2, dim=0)[1]
        reference = model.output_layer(mtp_hidden)[0][:, 0].float()   # [13, V]; row i -> t_{i+2}
    cache = LatentCache.for_config(model.config, num_blocks=20, block_size=2)
    decoder = LatentDecoder(model, cache)
    # main model: 6 tokens, then 4, then 3; MTP after each, at positions whose t_{i+1} is known
    done = 0
    for end in (6, 10, 13):
        _, h = decoder.forward([Chunk("r", tokens[done:end], done)])
        last = min(end, 12)   # position 12's next token is unknown
        mtp_logits = decoder.forward_mtp([Chunk("r", tokens[done + 1:last + 1], done)],
                                         h[:, : last - done])
        torch.testing.assert_close(mtp_logits[0], reference[done:last], **TOL)
        done = end


def test_greedy_generation_equals_argmax_of_rerunning_the_full_forward(model):
    prompts = [random_tokens(n, 10 + n) for n in (5, 9, 2)]
    engine = InferenceEngine(model, block_size=4, max_batch_size=3)
    events = []

    def check_blocks(event):
        events.append(event)
        owned = [b for t in engine.cache.tables.values() for b in t]
        assert len(owned) == len(set(owned))
        assert len(owned) + engine.cache.num_free_blocks == engine.cache.num_blocks

    results = engine.generate([Request(p, max_new_tokens=8) for p in prompts],
                              on_event=check_blocks)
    for p, r in zip(prompts, results):
        assert r.tokens == greedy_by_rerun(model, p, 8) and r.finish_reason == "length"
    # streamed: one token per request per step, in order, and every block back on the free list
    for i, r in enumerate(results):
        mine = [e for e in events if e.index == i]
        assert [t for e in mine for t in e.tokens] == r.tokens
        assert all(len(e.tokens) == 1 for e in mine) and mine[-1].finished
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.cache.tables


def test_requests_wait_for_free_blocks_and_reuse_them(model):
    prompts = [random_tokens(n, 20 + n) for n in (6, 3, 8, 4)]
    big = InferenceEngine(model, block_size=2, max_batch_size=4)
    expected = big.generate([Request(p, max_new_tokens=5) for p in prompts])
    # room for about two requests at a time: the others wait, then take the freed blocks
    small = InferenceEngine(model, block_size=2, num_blocks=12, max_batch_size=4)
    running_max = []
    got = small.generate([Request(p, max_new_tokens=5) for p in prompts],
                         on_event=lambda e: running_max.append(len(small.cache.tables)))
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert max(running_max) == 2 and small.cache.num_free_blocks == 12


def test_sampling_is_reproducible_and_stays_in_the_top_k_of_the_full_forward(model):
    prompts = [random_tokens(n, 30 + n) for n in (4, 7)]

    def run(seed):
        engine = InferenceEngine(model, block_size=4)
        reqs = [Request(p, max_new_tokens=10,
                        sampling=SamplingParams(temperature=1.0, top_k=3, seed=seed + i))
                for i, p in enumerate(prompts)]
        return [r.tokens for r in engine.generate(reqs)]

    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    for p, outs in ((prompts[0], [a[0], c[0]]), (prompts[1], [a[1], c[1]])):
        for out in outs:
            logits = full_logits(model, p + out)
            for j, t in enumerate(out):
                top3 = torch.topk(logits[len(p) + j - 1], 3).indices.tolist()
                assert t in top3
    # top_k=1 sampling is greedy decoding
    engine = InferenceEngine(model, block_size=4)
    one = engine.generate([Request(prompts[0], 6, SamplingParams(1.0, top_k=1, seed=3))])
    assert one[0].tokens == greedy_by_rerun(model, prompts[0], 6)


def test_logprobs_are_the_full_forwards_log_softmax_for_greedy_and_sampled_tokens(model):
    """The model's distribution (raw logits, not the temperature-scaled, top-k-cut one the sampler
    drew from) at the position that produced each token, in completions and stream events."""
    prompts = [random_tokens(n, 60 + n) for n in (4, 7, 2)]
    params = [SamplingParams(logprobs=3), SamplingParams(0.7, top_k=5, seed=1, logprobs=3),
              SamplingParams()]
    engine = InferenceEngine(model, block_size=4)
    events = []
    results = engine.generate([Request(p, 8, sp) for p, sp in zip(prompts, params)],
                              on_event=events.append)
    for i, (p, sp, r) in enumerate(zip(prompts, params, results)):
        reference = full_logits(model, p + r.tokens)[len(p) - 1: -1]
        assert_logprobs_match(reference, r, sp.logprobs)
        mine = [e for e in events if e.index == i]
        assert [x for e in mine for x in e.logprobs] == r.logprobs
        assert [x for e in mine for x in e.top_logprobs] == r.top_logprobs
    with pytest.raises(ValueError, match="logprobs=-1"):
        SamplingParams(logprobs=-1)


def test_stop_token_stop_string_and_length(model):
    tok = ByteTokenizer()
    prompt = random_tokens(6, 40)
    plain = greedy_by_rerun(model, prompt, 12)
    engine = InferenceEngine(model, block_size=4, decode=tok.detokenize)
    stop_at = next(j for j in range(3, 12) if plain[j] not in plain[:j])
    by_token = engine.generate([Request(prompt, 12, stop_token_ids=[plain[stop_at]])])[0]
    assert by_token.tokens == plain[:stop_at + 1] and by_token.finish_reason == "stop_token"
    # a stop string spanning two tokens: the text ends before it; tokens end where it completes
    text = tok.detokenize(plain)
    j = next(j for j in range(2, 12) if 0 < plain[j - 1] < 128 and 0 < plain[j] < 128
             and tok.detokenize(plain[j - 1:j + 1]) not in tok.detokenize(plain[:j]))
    stop = tok.detokenize(plain[j - 1:j + 1])
    by_string = engine.generate([Request(prompt, 12, stop_strings=[stop])])[0]
    assert by_string.finish_reason == "stop_string" and by_string.tokens == plain[:j + 1]
    assert by_string.text == text[: text.find(stop)]
    # streamed, the text is the same: no start of the stop string goes out before it completes
    streamed = "".join(e.text for e in engine.stream([Request(prompt, 12, stop_strings=[stop])]))
    assert streamed == by_string.text
    assert engine.generate([Request(prompt, 3)])[0].finish_reason == "length"
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_requests_that_cannot_run_are_refused(model):
    engine = InferenceEngine(model, block_size=4, num_blocks=3)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([Request([], 4)])
    with pytest.raises(ValueError, match="cache blocks"):
        engine.generate([Request([1] * 10, 8)])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([Request([1] * 250, 10)])
    with pytest.raises(ValueError, match="decode"):
        engine.generate([Request([1], 2, stop_strings=["x"])])
    # malformed requests are refused naming the field, before any token (a bare string was read
    # as its characters, an empty stop string ended every request after one token, an int
    # stop_token_ids failed mid-stream)
    engine.decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)
    for request, field in ((Request([1], 2, stop_strings="cs"), "stop_strings='cs'"),
                           (Request([1], 2, stop_strings=[""]), r"stop_strings=\[''\]"),
                           (Request([1], 2, stop_strings=[None]), r"stop_strings=\[None\]"),
                           (Request([1], 2, stop_token_ids=5), "stop_token_ids=5"),
                           (Request([1], 2, stop_token_ids=[-1]), r"stop_token_ids=\[-1\]"),
                           (Request([1], 2, sampling=None), "sampling=None"),
                           (Request(torch.tensor([1, 2]), 2), "prompt is a Tensor")):
        with pytest.raises(ValueError, match=f"request 0: {field}.*allowed"):
            engine.generate([request])
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_one_token_requests_and_an_abandoned_stream_return_their_blocks(model):
    prompts = [random_tokens(n, 50 + n) for n in (3, 5, 4)]
    engine = InferenceEngine(model, block_size=2, max_batch_size=3)
    results = engine.generate([Request(prompts[0], 1), Request(prompts[1], 4),
                               Request(prompts[2], 1)])
    assert [len(r.tokens) for r in results] == [1, 4, 1]
    assert results[1].tokens == greedy_by_rerun(model, prompts[1], 4)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    stream = engine.stream([Request(p, 20) for p in prompts])
    for _ in range(5):
        next(stream)
    assert engine.cache.num_free_blocks < engine.cache.num_blocks
    stream.close()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.cache.tables
