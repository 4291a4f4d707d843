"""Routing (moe/routing.py) against a naive per-token loop of DeepSeek-V3's gate."""

import itertools

import pytest
import torch

from megatron_dsv3.moe.routing import check_routing_args, route


def naive_route(logits, bias, topk, groups, group_topk, scale):
    """Token by token, in float64, exactly as ANCHORS.md describes the reference Gate."""
    T, E = logits.shape
    per = E // groups
    weights = torch.zeros(T, topk, dtype=torch.float64)
    chosen = []
    for t in range(T):
        s = torch.sigmoid(logits[t].double())
        b = s + (bias.double() if bias is not None else 0.0)
        group_score = []
        for g in range(groups):
            vals = sorted(b[g * per:(g + 1) * per].tolist(), reverse=True)
            group_score.append(sum(vals[:min(2, per)]))
        kept = sorted(range(groups), key=lambda g: -group_score[g])[:group_topk]
        candidates = [e for g in kept for e in range(g * per, (g + 1) * per)]
        top = sorted(candidates, key=lambda e: -b[e].item())[:topk]
        w = torch.stack([s[e] for e in top])
        weights[t] = w / w.sum() * scale
        chosen.append(sorted(top))
    return weights, chosen


CASES = [(16, 4, 2, 4), (16, 1, 1, 3), (32, 8, 4, 8), (12, 3, 3, 2), (8, 8, 2, 2)]


@pytest.mark.parametrize("E,groups,group_topk,topk", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_naive_per_token_loop(E, groups, group_topk, topk, with_bias):
    g = torch.Generator().manual_seed(E * 7 + groups)
    logits = torch.randn(40, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.3 if with_bias else None
    weights, indices = route(logits, bias, topk=topk, num_groups=groups, group_topk=group_topk,
                             scaling_factor=2.5)
    ref_w, ref_idx = naive_route(logits, bias, topk, groups, group_topk, 2.5)
    for t in range(logits.shape[0]):
        assert sorted(indices[t].tolist()) == ref_idx[t]
    # weights follow the chosen experts: compare as expert -> weight maps
    for t in range(logits.shape[0]):
        got = dict(zip(indices[t].tolist(), weights[t].double().tolist()))
        s = torch.sigmoid(logits[t].double())
        denom = sum(s[e].item() for e in ref_idx[t])
        for e in ref_idx[t]:
            assert abs(got[e] - s[e].item() / denom * 2.5) < 1e-6


def test_top1_weight_is_the_scaled_score_and_trains_the_gate():
    """Top-1 as Megatron's sigmoid router: the weight is sigmoid(logit) x scaling factor, not
    normalised (normalised, every weight was the constant 2.5 and the gate got no gradient
    from the loss)."""
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    weights, indices = route(logits, None, topk=1, num_groups=1, group_topk=1,
                             scaling_factor=2.5)
    want = torch.sigmoid(logits.detach()).gather(1, indices) * 2.5
    torch.testing.assert_close(weights, want)
    weights.sum().backward()
    assert logits.grad.abs().sum() > 0.1


def test_weights_sum_to_scaling_factor_and_use_unbiased_scores():
    logits = torch.randn(64, 16)
    bias = torch.zeros(16)
    bias[3] = 10.0  # forces expert 3 to be selected, but must not change its weight's formula
    w, idx = route(logits, bias, topk=4, num_groups=4, group_topk=2, scaling_factor=2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5))
    assert (idx == 3).any(-1).all()
    s = torch.sigmoid(logits)
    ref = s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(w, ref)


def test_group_limiting_never_picks_outside_the_kept_groups():
    g = torch.Generator().manual_seed(3)
    for trial in range(50):
        E, groups, group_topk, topk = 32, 8, 3, 6
        logits = torch.randn(128, E, generator=g) * 3
        bias = torch.randn(E, generator=g)
        _, idx = route(logits, bias, topk=topk, num_groups=groups, group_topk=group_topk)
        touched = (idx // (E // groups))
        for t in range(128):
            assert len(set(touched[t].tolist())) <= group_topk
        # and the kept groups are the best by top-2 biased score
        b = torch.sigmoid(logits) + bias
        gs = b.view(128, groups, -1).topk(2, -1).values.sum(-1)
        best = gs.topk(group_topk, -1).indices
        for t in range(128):
            assert set(touched[t].tolist()) <= set(best[t].tolist())


def test_route_weights_have_exact_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(6, 8, dtype=torch.float64) * 3).requires_grad_()
    bias = torch.randn(8, dtype=torch.float64)

    def f(x):
        return route(x, bias, topk=3, num_groups=4, group_topk=2, scaling_factor=1.5)[0]

    # selection is piecewise constant; gradcheck's small perturbations keep it fixed
    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("groups,group_topk,topk,field", [
    (4, 5, 3, "group_topk"),  # more groups kept than exist
    (5, 2, 3, "num_groups"),  # groups do not divide experts
    (4, 1, 5, "topk"),  # topk larger than the 4 experts of the one kept group
    (4, 0, 1, "group_topk"),
])
def test_bad_routing_arguments_name_the_argument(groups, group_topk, topk, field):
    with pytest.raises(ValueError, match=field):
        check_routing_args(16, topk=topk, num_groups=groups, group_topk=group_topk)


def test_a_token_whose_chosen_scores_all_underflow_gets_zero_weights_not_nan():
    """Logits below ~-104 give float32 sigmoid scores of exactly 0. With the bias choosing
    two such experts over a healthy one, the weights were 0 / 0 = NaN (then the layer's output
    and the loss); transformers' and Megatron's sigmoid routers give 0. Elsewhere unchanged."""
    logits = torch.tensor([[0.0, 0.0, -200.0, -200.0], [1.0, -1.0, 0.5, 2.0]])
    bias = torch.tensor([0.0, 0.0, 2.0, 2.0])
    weights, indices = route(logits, bias, topk=2, scaling_factor=2.5)
    assert sorted(indices[0].tolist()) == [2, 3]
    assert torch.equal(weights[0], torch.zeros(2))
    naive, _ = naive_route(logits[1:], bias, 2, 1, 1, 2.5)
    torch.testing.assert_close(weights[1:].double(), naive, rtol=0, atol=1e-7)
