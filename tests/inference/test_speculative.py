"""MTP speculative decoding: identical to plain greedy decoding, rolled-back cache, acceptance.

Two models: the tiny preset with random weights (drafts almost never accepted) and the same model
trained for a few dozen steps on a repeated sentence (main model and MTP head both learn it, so
most drafts are accepted and a main-model forward yields close to two tokens).
"""

import pytest
import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.inference import Chunk, InferenceEngine, LatentCache, LatentDecoder, Request
from megatron_dsv3.inference import SamplingParams
from megatron_dsv3.model import build_model
from megatron_dsv3.testing.tiny_training import train_on_repeated_text

from logprobs_reference import assert_logprobs_match

SENTENCE = b"the quick brown fox jumps over the lazy dog; "
PROMPTS = [b"the quick", b"over the lazy dog; the", b"fox jumps", b"xyz q", b"t"]


@pytest.fixture(scope="module")
def random_model(single_rank_world):
    torch.manual_seed(0)
    return build_model(get_config("deepseek-v3-tiny", init_method_std=0.2)).eval()


@pytest.fixture(scope="module")
def trained_model(single_rank_world):
    """40 AdamW steps on windows of a repeated sentence (LM loss + MTP loss, as in training).
    (After 30 the acceptance of one seed moved between 0.47 and 0.92 with the thread count and
    small changes of the aux loss; after 40 it is 0.72-0.90 for seeds 0-2 on 1 and 2 threads.)"""
    torch.manual_seed(0)
    return train_on_repeated_text(build_model(get_config("deepseek-v3-tiny")), SENTENCE,
                                  steps=40)


def plain_and_speculative(model, prompts, max_new, block_size=2, **request_kw):
    requests = [Request(list(p), max_new, **request_kw) for p in prompts]
    plain = InferenceEngine(model, block_size=block_size).generate(requests)
    engine = InferenceEngine(model, block_size=block_size, max_batch_size=len(prompts))
    spec = engine.generate(requests, speculative=True)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.cache.tables
    return plain, spec, engine.stats


def assert_token_accounting(stats, num_requests):
    """Each main-model forward yields its verified token plus, when the draft was accepted, the
    token after it (one fewer where max_new_tokens cut a request's last step short)."""
    assert stats.drafted == stats.forwards > 0
    assert stats.forwards + stats.accepted - num_requests <= stats.tokens
    assert stats.tokens <= stats.forwards + stats.accepted


def test_speculative_equals_greedy_with_random_weights(random_model):
    prompts = [torch.randint(1, 255, (n,)).tolist() for n in (4, 9, 1, 6)]
    plain, spec, stats = plain_and_speculative(random_model, prompts, 10)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert_token_accounting(stats, len(prompts))


def test_speculative_equals_greedy_on_a_trained_model_with_high_acceptance(trained_model):
    plain, spec, stats = plain_and_speculative(trained_model, PROMPTS, 24)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    print(f"\nMTP acceptance {stats.acceptance_rate:.1%} ({stats.accepted}/{stats.drafted}), "
          f"{stats.tokens_per_forward:.2f} tokens per main-model forward")
    assert 0.5 < stats.acceptance_rate
    assert_token_accounting(stats, len(PROMPTS))
    assert stats.tokens_per_forward > 1.4


def test_speculative_logprobs_are_the_full_forwards_log_softmax(trained_model):
    """Accepted pairs included: each token's log-probability (and top-2) is read from the
    verifying forward at its position and equals log_softmax of a full forward's logits there."""
    requests = [Request(list(p), 16, SamplingParams(logprobs=2)) for p in PROMPTS[:3]]
    engine = InferenceEngine(trained_model, block_size=2, max_batch_size=3)
    spec = engine.generate(requests, speculative=True)
    assert engine.stats.accepted > 0
    for request, r in zip(requests, spec):
        ids = request.prompt + r.tokens
        with torch.no_grad():
            logits = trained_model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0]
        assert_logprobs_match(logits.float()[len(request.prompt) - 1: -1], r, 2,
                              tol=dict(rtol=1e-4, atol=1e-4))


def test_stop_tokens_cut_an_accepted_pair(trained_model):
    plain = InferenceEngine(trained_model, block_size=2).generate(
        [Request(list(b"the quick"), 20)])[0].tokens
    for stop in set(plain[2:10]):
        kw = dict(stop_token_ids=[stop])
        a, b, _ = plain_and_speculative(trained_model, [b"the quick"], 20, **kw)
        assert b[0].tokens == a[0].tokens and b[0].tokens[-1] == stop


def test_rolled_back_positions_leave_the_cache_as_a_fresh_prefill_would(trained_model):
    """After every step the request's blocks cover exactly the accepted positions, and the cached
    latents of every main and MTP layer equal those of a fresh prefill of the accepted tokens."""
    prompt = list(b"xyz the quick")
    engine = InferenceEngine(trained_model, block_size=1, max_batch_size=1)
    # The trained MTP head may get every draft of this prompt right; spoil every third one (its
    # argmax moved to the next token id) so that rejections and their roll-back surely happen.
    mtp, calls = engine.decoder.forward_mtp, [0]

    def spoiled_mtp(*args, **kwargs):
        logits = mtp(*args, **kwargs)
        calls[0] += 1
        return logits.roll(1, dims=-1) if calls[0] % 3 == 0 else logits

    engine.decoder.forward_mtp = spoiled_mtp
    cfg = trained_model.config
    generated, checked = [], 0

    def check(event):
        nonlocal checked
        generated.extend(event.tokens)
        if event.finished:
            return
        seq = prompt + generated[:-1]            # in the cache; generated[-1] is pending
        table = engine.cache.tables[0]
        assert len(table) == len(seq)            # block_size 1: one block per kept position
        fresh = LatentCache.for_config(cfg, num_blocks=len(seq) + 1, block_size=3)
        decoder = LatentDecoder(trained_model, fresh)
        _, h = decoder.forward([Chunk(0, seq, 0)])
        decoder.forward_mtp([Chunk(0, seq[1:] + generated[-1:], 0)], h)
        index = fresh.gather_index([0], [len(seq)])
        for layer in range(cfg.num_layers + 1):
            got = engine.cache.data[layer, table, 0]
            want = torch.cat(fresh.read(layer, index), -1)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        checked += 1

    engine.generate([Request(prompt, 16)], speculative=True, on_event=check)
    stats = engine.stats
    assert 0 < stats.accepted < stats.drafted    # both accepted and rejected drafts happened
    assert checked >= 5


def test_speculative_decoding_refuses_sampling(random_model):
    engine = InferenceEngine(random_model, block_size=4)
    with pytest.raises(ValueError, match="greedy"):
        engine.generate([Request([1, 2], 3, SamplingParams(temperature=1.0))], speculative=True)


def test_a_request_fits_the_blocks_it_reserves_exactly(random_model):
    """Reserved: positions [0, prompt + max_new_tokens) - the last token is never fed back, the
    speculative step's draft is. A cache of exactly that many blocks serves the request plain
    and speculative, two such requests one after the other, with the unlimited cache's tokens."""
    prompts = [torch.randint(1, 255, (5,)).tolist(), torch.randint(1, 255, (9,)).tolist()]
    requests = [Request(prompts[0], 7), Request(prompts[1], 3)]  # 12 positions: 3 blocks of 4
    expected = InferenceEngine(random_model, block_size=4).generate(requests)
    for speculative in (False, True):
        engine = InferenceEngine(random_model, block_size=4, num_blocks=3, max_batch_size=2)
        assert [engine.blocks_needed(r) for r in requests] == [3, 3]
        got = engine.generate(requests, speculative=speculative)
        assert [r.tokens for r in got] == [r.tokens for r in expected]
        assert engine.cache.num_free_blocks == 3
