"""Multi-token prediction: the loss is depth 1's shifted cross-entropy, and depth 1 learns t+2."""

import math

import torch
import torch.nn.functional as F

from megatron_dsv3.configs import get_config
from megatron_dsv3.model import build_model
from megatron_dsv3.mtp.layer import roll_left


def test_mtp_loss_is_the_cross_entropy_of_token_t_plus_2(single_rank_world):
    config = get_config("deepseek-v3-tiny")
    model = build_model(config)
    model.train()
    b, s = 2, 16
    ids = torch.randint(1, 255, (b, s))
    labels = torch.roll(ids, -1, dims=1)  # next token at every position
    pos = torch.arange(s).expand(b, s)
    with torch.no_grad():
        model(ids, pos, None, labels=labels)
        got = model.pop_mtp_losses()
        # by hand, from the modules: h0 = decoder output, depth 1 sees Emb(t+1)
        h0 = model.decoder(model.embedding(input_ids=ids, position_ids=pos), attention_mask=None)
        layer = model.mtp.layers[0]
        e = model.embedding(input_ids=roll_left(ids), position_ids=roll_left(pos))
        x, _ = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h0)], -1))
        x, _ = layer.transformer_layer(x)
        logits, _ = model.output_layer(layer.final_layernorm(x))  # [s, b, V]
        target = roll_left(labels)  # token t+2
        ce = F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]),
                             target.reshape(-1), reduction="none").view(b, s)
        mask = roll_left(torch.ones(b, s))  # the last position has no t+2
        expected = (ce * mask).sum() / mask.sum()
    assert got.shape == (1,)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)


def test_mtp_gradient_is_lambda_over_depth_times_the_depths_loss(single_rank_world):
    """Two depths, lambda = 0.3: the last depth's eh_proj (read by no other loss) gets exactly
    (0.3 / 2) x the gradient of that depth's cross-entropy, computed by hand from the modules
    (depth k reads Emb(t+k) and depth k-1's output; its target is token t+k+1)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    torch.manual_seed(0)
    config = get_config("deepseek-v3-tiny", mtp_num_layers=2, mtp_loss_scaling_factor=0.3,
                        moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    model = build_model(config)
    model.train()
    b, s = 2, 16
    ids = torch.randint(1, 255, (b, s))
    labels = torch.roll(ids, -1, dims=1)
    pos = torch.arange(s).expand(b, s)
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    model(ids, pos, None, labels=labels).mean().backward()  # (the main loss reaches no MTP layer)
    got = model.mtp.layers[1].eh_proj.weight.grad.clone()
    model.pop_mtp_losses()
    h = model.decoder(model.embedding(input_ids=ids, position_ids=pos), attention_mask=None)
    ids_k, pos_k, target, mask = ids, pos, labels, torch.ones(b, s)
    for layer in model.mtp.layers:
        ids_k, pos_k, target, mask = (roll_left(t) for t in (ids_k, pos_k, target, mask))
        e = model.embedding(input_ids=ids_k, position_ids=pos_k)
        x, _ = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h)], -1))
        h, _ = layer.transformer_layer(x)
        logits, _ = model.output_layer(layer.final_layernorm(h))
        ce = F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]),
                             target.reshape(-1), reduction="none").view(b, s)
        loss = (ce * mask).sum() / mask.sum()
    expected = (0.3 / 2) * torch.autograd.grad(loss, model.mtp.layers[1].eh_proj.weight)[0]
    assert got.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def _sequences(n, s, gen):
    """Even positions follow a_{i+1} = 5 a_i + 1 (mod 32); odd positions are random noise
    (symbols 32..63): token t+1 says nothing about t+2, token t determines it."""
    out = torch.empty(n, s, dtype=torch.long)
    a = torch.randint(0, 32, (n,), generator=gen)
    for t in range(0, s, 2):
        out[:, t] = a
        out[:, t + 1] = torch.randint(32, 64, (n,), generator=gen)
        a = (5 * a + 1) % 32
    return out


def test_mtp_depth_1_learns_to_predict_token_t_plus_2(single_rank_world):
    torch.manual_seed(0)
    config = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.0, mtp_loss_scaling_factor=1.0)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    s = 24
    pos = torch.arange(s).expand(16, s)
    # MTP at position t predicts token t+2; count only even t (mask[t + 1] = 1 for odd t + 1)
    mask = torch.zeros(16, s)
    mask[:, 1::2] = 1.0
    history = []
    for step in range(150):
        ids = _sequences(16, s, gen)
        labels = torch.roll(ids, -1, dims=1)
        loss = model(ids, pos, None, labels=labels, loss_mask=mask)
        (loss * mask).sum().div(mask.sum()).backward()
        opt.step()
        opt.zero_grad()
        history.append(model.pop_mtp_losses()[0].item())
    start, end = sum(history[:5]) / 5, sum(history[-10:]) / 10
    assert start > math.log(32)  # chance or worse at the start
    assert end < 0.3, (start, end)  # t+2 predicted from t, through the noise at t+1


def test_megatron_schedule_trains_our_mtp_with_the_gradients_of_a_plain_backward(
        single_rank_world, monkeypatch):
    """Megatron's own schedule (no pipelining, as pretrain() runs with PP=1) over a model with our
    MTP: it addresses each MTP layer's inner transformer layer (0.16: `transformer_layer`; from
    0.17 `mtp_model_layer`, asserted by set_current_microbatch), scales the MTP loss by its
    MTPLossAutoScaler and gives the gradients of a hand-written loop over the same micro-batches."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from megatron_dsv3.compat import cuda_on_cpu

    config = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.0)
    model = build_model(config)
    b, s, n = 2, 16, 2
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 255, (b, s + 1), generator=gen)
        batches.append((ids[:, :-1], ids[:, 1:], torch.arange(s).expand(b, s)))

    # reference: mean token loss per micro-batch, averaged over micro-batches; MTP scaled alike
    monkeypatch.setattr(MTPLossAutoScaler, "main_loss_backward_scale",
                        MTPLossAutoScaler.main_loss_backward_scale)  # restored after the test
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0 / n))
    for ids, labels, pos in batches:
        model(ids, pos, None, labels=labels).float().mean().div(n).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    expected_mtp = model.pop_mtp_losses()
    model.zero_grad(set_to_none=True)

    def loss_func(per_token):
        total = per_token.float().sum()
        return total, torch.tensor(per_token.numel(), dtype=torch.int), {"lm loss": total.detach()}

    def forward_step(data_iterator, model):
        ids, labels, pos = next(data_iterator)
        return model(ids, pos, None, labels=labels), loss_func

    # as at the start of a Megatron run (earlier tests may leave a 0-dim scale that Megatron's
    # schedule, which sets a [1]-shaped one, cannot copy into); restored after the test
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    with cuda_on_cpu(schedules):
        schedules.forward_backward_no_pipelining(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=n, seq_length=s, micro_batch_size=b, forward_only=False)
    torch.testing.assert_close(model.pop_mtp_losses(), expected_mtp)
    assert [m.mtp_model_layer for m in model.mtp.layers] == \
        [m.transformer_layer for m in model.mtp.layers]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(expected[name].abs().sum() > 0 for name, _ in model.mtp.named_parameters(
        prefix="mtp"))  # MTP took part in both


def test_padding_mask_reaches_each_mtp_depth_shifted_with_its_input(single_rank_world):
    """padding_mask (MoE routing leaves padded positions out) reaches the MTP layers' routers on
    every megatron-core version, shifted with the input ids as Megatron >= 0.18 does: at depth k
    position i reads token i + k, and a position whose token i + k lies past the end reads none,
    so it is padding too (Megatron's zero fill counts it). Left padding of 2 in one sequence and
    right padding of 3 in the other give 11 (decoder), 10 (depth 1) and 9 (depth 2) tokens."""
    config = get_config("deepseek-v3-tiny", mtp_num_layers=2)
    model = build_model(config)
    model.train()
    b, s = 2, 8
    ids = torch.randint(1, 255, (b, s))
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, 5:], pad[1, :2] = True, True
    routers = {name: m for name, m in model.named_modules() if hasattr(m, "local_tokens_per_expert")}
    for m in routers.values():
        m.local_tokens_per_expert.zero_()
    model(ids, None, None, labels=torch.roll(ids, -1, 1), loss_mask=(~pad).float(),
          padding_mask=pad)
    topk = config.moe_router_topk
    routed = {name: int(m.local_tokens_per_expert.sum()) // topk for name, m in routers.items()}
    for depth in range(3):
        # position i at this depth is a routed token iff token i + depth exists and is not padding
        want = sum(1 for j in range(b) for i in range(s) if i + depth < s and not pad[j, i + depth])
        names = [n for n in routed if (n.startswith(f"mtp.layers.{depth - 1}.") if depth
                                       else n.startswith("decoder."))]
        assert names and all(routed[n] == want for n in names), (depth, want, routed)
    # (a zero fill at the end counted the positions past the last token as real: 12 and 13)
    assert [routed["mtp.layers.0.transformer_layer.mlp.router"],
            routed["mtp.layers.1.transformer_layer.mlp.router"]] == [10, 9], routed


def test_without_a_padding_mask_the_positions_past_the_last_token_are_not_routed(
        single_rank_world):
    """No padding_mask: every token is real, and at depth k the last k positions of each
    sequence read no token (their input id is a fill), so the router's loads leave them out."""
    config = get_config("deepseek-v3-tiny", mtp_num_layers=2)
    model = build_model(config)
    model.train()
    b, s = 2, 8
    ids = torch.randint(1, 255, (b, s))
    routers = {name: m for name, m in model.named_modules() if hasattr(m, "local_tokens_per_expert")}
    for m in routers.values():
        m.local_tokens_per_expert.zero_()
    model(ids, None, None, labels=torch.roll(ids, -1, 1))
    topk = config.moe_router_topk
    for depth in (1, 2):
        routed = [int(m.local_tokens_per_expert.sum()) // topk for n, m in routers.items()
                  if n.startswith(f"mtp.layers.{depth - 1}.")]
        assert routed == [b * (s - depth)], (depth, routed)


def test_mtp_process_without_mtp_layers_is_refused_by_name(single_rank_world):
    import pytest

    from megatron_dsv3.model import DeepSeekV3Model

    with pytest.raises(ValueError, match=r"mtp_process=True needs MTP layers: config.mtp_num_layers is None"):
        DeepSeekV3Model(get_config("deepseek-v3-tiny", mtp_num_layers=None), mtp_process=True)


def test_per_token_mtp_loss_is_scaled_as_the_installed_megatron_scales_it():
    """Under calculate_per_token_loss Megatron divides every gradient by the main loss's tokens
    T; from megatron-core 0.18 its MTP loss scales each depth's sum by T / T_k (the depth's
    tokens), before that it is the plain sum. The gradient reaching each depth's hidden states
    against that closed form."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from megatron_dsv3 import compat
    from megatron_dsv3.mtp.loss import attach_mtp_losses

    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    torch.manual_seed(0)
    b, s, h, V = 2, 6, 4, 11
    W = torch.randn(V, h)
    labels = torch.randint(0, V, (b, s))
    mask = torch.ones(b, s)
    mask[0, 3:] = 0

    def token_loss(lab, logits):  # logits [s, b, V] -> [b, s]
        return F.cross_entropy(logits.transpose(0, 1).reshape(-1, V), lab.reshape(-1),
                               reduction="none").view(b, s)

    mtp = [torch.randn(s, b, h, requires_grad=True) for _ in range(2)]
    hidden = torch.randn(s, b, h, requires_grad=True)
    out, _ = attach_mtp_losses(hidden, mtp, labels, mask, logits_of=lambda x: x @ W.t(),
                               token_loss=token_loss, scaling_factor=0.3, per_token_loss=True)
    out.sum().backward()
    reference = [t.detach().clone().requires_grad_() for t in mtp]
    total, T = 0.0, mask.sum()
    for k, hk in enumerate(reference, start=1):
        lab_k = torch.full_like(labels, 0)
        lab_k[:, :s - k] = labels[:, k:]
        mask_k = torch.zeros_like(mask)
        mask_k[:, :s - k] = mask[:, k:]
        depth_sum = (token_loss(lab_k, hk @ W.t()) * mask_k).sum()
        rescale = T / mask_k.sum() if compat.MTP_PER_TOKEN_LOSS_RESCALED else 1.0
        total = total + 0.3 / 2 * rescale * depth_sum
    total.backward()
    for got, want in zip(mtp, reference):
        torch.testing.assert_close(got.grad, want.grad)
