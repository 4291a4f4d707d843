"""Sampling: top-k / top-p supports against a plain-Python reference, seeded reproducibility."""

import math

import pytest
import torch

from megatron_dsv3.inference.sampling import SamplingParams, filtered_logits, sample_next


def reference_support(logits, temperature, top_k, top_p):
    """Token ids that may be sampled, from the definitions (sorted list, cumulative mass)."""
    values = [v / temperature for v in logits.tolist()]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if top_k:
        order = order[:top_k]
    z = sum(math.exp(values[i]) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(values[i]) / z
    return set(kept)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.5), (1.0, 0, 0.05), (2.0, 3, 0.99)])
def test_support_matches_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = torch.randn(64, generator=g) * 3
        params = SamplingParams(temperature, top_k, top_p)
        got = filtered_logits(logits, params)
        support = set(torch.nonzero(torch.isfinite(got)).flatten().tolist())
        assert support == reference_support(logits, temperature, top_k, top_p)
        # inside the support the distribution is softmax(logits / T) renormalised
        probs = torch.softmax(got, -1)
        ids = sorted(support)
        ref = torch.softmax(logits[ids] / temperature, -1)
        torch.testing.assert_close(probs[ids], ref)


def test_seeded_sampling_is_reproducible_and_stays_in_top_k():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.5, top_k=4, seed=7)
    top4 = set(torch.topk(logits, 4).indices.tolist())

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, params, g) for _ in range(200)]

    a, b, c = draw(7), draw(7), draw(8)
    assert a == b and a != c
    assert set(a) <= top4 and len(set(a)) == 4   # every allowed token shows up, nothing else
    # frequencies follow softmax(logits / T) over the top 4 (loose bound for 200 draws)
    probs = torch.softmax(logits[sorted(top4)] / 1.5, -1)
    for i, p in zip(sorted(top4), probs.tolist()):
        assert abs(a.count(i) / 200 - p) < 0.12


def test_greedy_is_argmax_and_bad_parameters_are_refused():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_next(logits, SamplingParams()) == 1
    for kwargs, field in (({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_a_very_small_temperature_samples_the_maximum_instead_of_failing():
    """logits / 1e-39 overflow to inf (softmax: NaN, multinomial fails); shifted by their maximum
    first, the distribution is the limit one: the maximum's token."""
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    params = SamplingParams(temperature=1e-39, seed=0)
    draws = {sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {1}
    # below float32's smallest value (~1e-45) the temperature itself is 0 in float32 (0 / 0 at
    # the maximum): the limit again, ties sharing the mass
    for temperature in (1e-46, 1e-300, 5e-324):
        params = SamplingParams(temperature=temperature, seed=0)
        draws = {sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(20)}
        assert draws == {1}, temperature
    tied = torch.tensor([3.0, 0.0, 3.0])
    params = SamplingParams(temperature=1e-300, seed=0)
    draws = {sample_next(tied, params, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {0, 2}


def test_a_very_large_temperature_keeps_the_top_k_and_samples_them_uniformly():
    """logits / 1e39 are all 0 in float32: top-k, taken after the division, kept the whole
    vocabulary. The limit is the uniform distribution over the top k."""
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    for temperature in (1.0, 1e30, 1e39, 1e300):
        got = filtered_logits(logits, SamplingParams(temperature=temperature, top_k=2))
        assert torch.isfinite(got).nonzero().flatten().tolist() == [0, 1], temperature
    probs = torch.softmax(filtered_logits(logits, SamplingParams(temperature=1e300, top_k=2)), -1)
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]))
