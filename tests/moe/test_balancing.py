"""Aux-loss-free bias balancing and the sequence-wise auxiliary loss."""

import torch

from megatron_dsv3.moe.balancing import update_expert_biases, updated_expert_bias
from megatron_dsv3.moe.router import load_balancing_loss
from megatron_dsv3.moe.routing import route, tokens_per_expert


def test_bias_update_moves_against_the_load():
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])
    new = updated_expert_bias(load, torch.zeros(4), 0.1)
    # mean load 5: the overloaded expert's bias falls, the others' rise
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(updated_expert_bias(torch.full((4,), 3.0), torch.ones(4), 0.1),
                               torch.ones(4))


def test_bias_updates_drive_a_skewed_router_toward_balance():
    torch.manual_seed(0)
    E, T = 16, 2048
    skew = torch.linspace(2.0, -2.0, E)  # the router strongly prefers low-numbered experts
    bias = torch.zeros(E)

    def max_over_mean(b):
        logits = torch.randn(T, E) * 0.5 + skew
        _, idx = route(logits, b, topk=4, num_groups=4, group_topk=2)
        load = tokens_per_expert(idx, E)
        return load, (load.max() / load.mean()).item()

    _, start = max_over_mean(bias)
    for _ in range(300):
        load, _ = max_over_mean(bias)
        bias = updated_expert_bias(load, bias, 0.02)
    _, end = max_over_mean(bias)
    assert start > 3.0
    assert end < 1.3, (start, end)


def naive_seq_aux_loss(scores, indices, seq_len, topk):
    T, E = scores.shape
    b = T // seq_len
    total = 0.0
    for j in range(b):
        rows = [t * b + j for t in range(seq_len)]  # Megatron's [s, b] token order
        f = torch.zeros(E, dtype=torch.float64)
        p = torch.zeros(E, dtype=torch.float64)
        for t in rows:
            for e in indices[t].tolist():
                f[e] += E / (topk * seq_len)
            p += scores[t].double() / scores[t].double().sum() / seq_len
        total += (f * p).sum()
    return total / b


def test_sequence_aux_loss_matches_the_report_formula():
    """The router's 'seq_aux_loss' is DeepSeek-V3's eq. 17-20: f_i from each token's top-k of its
    unbiased affinities over all experts, P_i the mean normalised affinity, per sequence."""
    torch.manual_seed(1)
    s, b, E, k = 12, 3, 8, 2
    logits = torch.randn(s * b, E)
    scores = torch.sigmoid(logits)
    idx = scores.topk(k, dim=-1).indices
    got = load_balancing_loss("seq_aux_loss", logits, topk=k, seq_len=s)
    assert abs(got.item() - naive_seq_aux_loss(scores, idx, s, k).item()) < 1e-6
    # a perfectly balanced uniform router scores exactly 1: every expert chosen equally often
    uniform = torch.zeros(s * b, E)
    uniform[torch.arange(s * b)[:, None], torch.arange(s * b * k).view(s * b, k) % E] = 1e-3
    assert abs(load_balancing_loss("seq_aux_loss", uniform, topk=k, seq_len=s).item() - 1.0) < 1e-3


def test_aux_loss_gradient_reaches_the_router(single_rank_world, tiny_config):
    from megatron_dsv3.moe.router import SigmoidGroupRouter

    router = SigmoidGroupRouter(tiny_config)
    router.train()
    x = torch.randn(24, tiny_config.hidden_size)
    _, _, aux = router(x, seq_len=8)
    aux.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.local_tokens_per_expert.sum() == 24 * tiny_config.moe_router_topk


def test_update_expert_biases_over_model_chunks(single_rank_world, tiny_config):
    from megatron_dsv3.moe.router import SigmoidGroupRouter

    routers = [SigmoidGroupRouter(tiny_config) for _ in range(2)]
    routers[0].local_tokens_per_expert.copy_(torch.arange(16.0))
    routers[1].local_tokens_per_expert.copy_(torch.arange(16.0).flip(0))
    update_expert_biases(routers, 0.5)
    assert routers[0].expert_bias[0] == 0.5 and routers[0].expert_bias[15] == -0.5
    assert routers[1].expert_bias[0] == -0.5 and routers[1].expert_bias[15] == 0.5
    assert all(r.local_tokens_per_expert.sum() == 0 for r in routers)
