"""DeepSeekMoE against a naive per-token loop using the module's own weights."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.configs import get_config
from megatron_dsv3.layer_specs import get_layer_spec
from megatron_dsv3.moe.layer import DeepSeekMoE


def build_moe(config):
    moe_spec = get_layer_spec(config).submodules.moe
    return DeepSeekMoE(config, moe_spec.submodules, layer_number=2)


def naive_moe(moe, x):
    """For each token: route, then shared(x) + sum_k w_k * expert_{i_k}(x), in float64."""
    cfg = moe.config
    w_gate = moe.router.weight.double()
    bias = moe.router.expert_bias.double()
    fc1, fc2 = moe.experts.fc1_weight.double(), moe.experts.fc2_weight.double()
    sh1 = moe.shared_experts.linear_fc1.weight.double()
    sh2 = moe.shared_experts.linear_fc2.weight.double()
    per = cfg.num_moe_experts // cfg.moe_router_num_groups
    out = []
    for t in range(x.shape[0]):
        xt = x[t].double()
        s = torch.sigmoid(w_gate @ xt)
        b = s + bias
        gscore = [b[g * per:(g + 1) * per].topk(2).values.sum() for g in range(cfg.moe_router_num_groups)]
        kept = torch.stack(gscore).topk(cfg.moe_router_group_topk).indices.tolist()
        cand = [e for g in kept for e in range(g * per, (g + 1) * per)]
        top = sorted(cand, key=lambda e: -b[e].item())[:cfg.moe_router_topk]
        w = torch.stack([s[e] for e in top])
        w = w / w.sum() * cfg.moe_router_topk_scaling_factor
        h1 = sh1 @ xt
        y = sh2 @ (F.silu(h1[: h1.shape[0] // 2]) * h1[h1.shape[0] // 2:])
        for wk, e in zip(w, top):
            h = fc1[e] @ xt
            f = h.shape[0] // 2
            y = y + wk * (fc2[e] @ (F.silu(h[:f]) * h[f:]))
        out.append(y)
    return torch.stack(out)


@pytest.fixture
def moe_and_input(single_rank_world):
    config = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.0)
    torch.manual_seed(0)
    moe = build_moe(config)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(6, 2, config.hidden_size, requires_grad=True)
    return moe, x


def test_moe_forward_matches_naive_per_token_loop(moe_and_input):
    moe, x = moe_and_input
    out, bias = moe(x)
    assert bias is None and out.shape == x.shape
    ref = naive_moe(moe, x.detach().reshape(-1, x.shape[-1])).view_as(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_moe_gradients_match_naive_per_token_loop(moe_and_input):
    moe, x = moe_and_input
    g = torch.randn_like(x)
    out, _ = moe(x)
    (out * g).sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters()}
    got_x = x.grad.clone()
    # reference gradients: autograd through the naive loop
    params = dict(moe.named_parameters())
    for p in params.values():
        p.grad = None
    xr = x.detach().double().requires_grad_()
    ref = naive_moe(moe, xr.reshape(-1, x.shape[-1])).view_as(out)
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(got_x.double(), xr.grad, rtol=1e-4, atol=1e-6)
    for name, p in params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(got[name].double(), p.grad.double(), rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_dropless_when_every_token_picks_the_same_experts(moe_and_input):
    moe, x = moe_and_input
    with torch.no_grad():
        moe.router.expert_bias.zero_()
        moe.router.expert_bias[:4] = 100.0  # all tokens -> experts 0..3 (group 0), nothing dropped
    out, _ = moe(x)
    ref = naive_moe(moe, x.detach().reshape(-1, x.shape[-1])).view_as(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert moe.router.local_tokens_per_expert[:4].tolist() == [12.0] * 4


def test_aux_loss_joins_backward_through_the_output(single_rank_world):
    config = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.1)
    moe = build_moe(config)
    x = torch.randn(8, 2, config.hidden_size)
    out, _ = moe(x)
    # zero upstream gradient: the router still gets the aux loss gradient
    (out * 0).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.router.last_aux_loss is not None and moe.router.last_aux_loss > 0


def test_an_integer_padding_mask_routes_as_the_bool_one_and_a_wrong_shape_is_refused(
        single_rank_world):
    """Megatron's MoELayer reads an integer 0/1 padding_mask as bool; a bitwise ~ on it made
    indices -1/-2 of a 'mask' (garbage loads, negative aux loss). A [s, b] or wrong-length mask
    is refused naming the shape, not applied to the wrong tokens or an IndexError."""
    config = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.1)
    moe = build_moe(config)
    s, b = 6, 2
    x = torch.randn(s, b, config.hidden_size)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, 4:] = True
    results = []
    for mask in (pad, pad.long()):
        moe.router.local_tokens_per_expert.zero_()
        moe(x, padding_mask=mask)
        results.append((moe.router.local_tokens_per_expert.clone(),
                        float(moe.router.last_aux_loss)))
    (loads_bool, aux_bool), (loads_int, aux_int) = results
    assert loads_bool.sum() == (b * s - 2) * config.moe_router_topk
    torch.testing.assert_close(loads_int, loads_bool)
    assert aux_int == aux_bool > 0
    for bad in (pad.t().contiguous(), torch.zeros(b, s + 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"padding_mask has shape .*allowed is "
                                             r"\[batch, sequence\] = \(2, 6\)"):
            moe(x, padding_mask=bad)
    with pytest.raises(ValueError, match="padding_mask has dtype torch.float32"):
        moe(x, padding_mask=pad.float())


def _train_and_serve_with_tp_peers_in_the_ep_group(rank, world):
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny", tensor_model_parallel_size=2,
                                   expert_model_parallel_size=2, expert_tensor_parallel_size=1,
                                   mtp_num_layers=None))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).expand(2, 8)
    model.eval()
    with torch.no_grad():
        model(ids, pos, None)  # serving in this layout is right (each token seen twice)
    model.train()
    try:
        model(ids, pos, None, labels=ids)
    except ValueError as error:
        return str(error)
    return "trained"


def test_training_with_tensor_parallel_peers_in_the_expert_parallel_group_is_refused():
    """Without sequence parallelism tensor-parallel ranks hold the same tokens: in one expert-
    parallel group each would dispatch them, and the experts' weight gradients would be
    multiplied by the number of such peers."""
    from megatron_dsv3.testing import run_distributed

    messages = run_distributed(_train_and_serve_with_tp_peers_in_the_ep_group, 2,
                               megatron_parallel=dict(tensor_model_parallel_size=2,
                                                      expert_model_parallel_size=2,
                                                      expert_tensor_parallel_size=1))
    assert all("expert-parallel group holds tensor-parallel peers" in m for m in messages)
