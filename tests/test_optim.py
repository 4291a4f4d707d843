"""AdamW with BF16 moments against torch's AdamW."""

import pytest
import torch

from megatron_dsv3.optim import AdamW


def _run(opt_cls, steps=20, **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = opt_cls([w], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad = torch.randn(64, 32, generator=g)
        opt.step()
    return w.detach(), opt


def test_float32_moments_equal_torch_adamw():
    ref, _ = _run(torch.optim.AdamW)
    got, _ = _run(AdamW, moment_dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_bf16_moments_stay_close_and_are_stored_in_bf16():
    ref, _ = _run(torch.optim.AdamW)
    got, opt = _run(AdamW)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    # 20 steps of lr 1e-2 move weights by ~0.2; BF16 moments change that by well under 1%
    rel = (got - ref).norm() / (ref - _run(AdamW, steps=0)[0]).norm()
    assert rel < 0.01, rel


def test_state_dict_round_trip_continues_identically():
    w1, opt1 = _run(AdamW, steps=5)
    w2 = torch.nn.Parameter(w1.clone())
    opt2 = AdamW([w2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt2.load_state_dict(opt1.state_dict())
    p1 = opt1.param_groups[0]["params"][0]
    g = torch.randn(64, 32)
    p1.grad, w2.grad = g.clone(), g.clone()
    opt1.step()
    opt2.step()
    assert next(iter(opt2.state.values()))["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(p1, w2)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="moment_dtype"):
        AdamW([torch.nn.Parameter(torch.zeros(1))], moment_dtype=torch.int8)
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))


def test_bf16_parameters_are_refused_because_master_weights_are_fp32():
    with pytest.raises(ValueError, match="FP32 master weights.*torch.float32"):
        AdamW([torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))])


def _adamw_float64(steps=20):
    """The AdamW formula written out in float64 (the reference for both torch kernels)."""
    torch.manual_seed(0)
    w = torch.randn(64, 32).double()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    g_ = torch.Generator().manual_seed(1)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    for t in range(1, steps + 1):
        g = torch.randn(64, 32, generator=g_).double()
        w = w * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return w


def test_trainer_adamw_is_fused_on_cpu_and_matches_the_formula():
    from megatron_dsv3.optim import torch_adamw

    ctor, kind = torch_adamw([torch.zeros(2)])
    assert kind == "fused"
    got, opt = _run(ctor)
    assert opt.defaults["fused"] is True
    ref = _adamw_float64()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    foreach, _ = _run(torch.optim.AdamW, foreach=True)
    torch.testing.assert_close(got, foreach, rtol=0, atol=2e-6)
    # a device or dtype the fused kernel does not take gets the foreach form
    assert torch_adamw([torch.zeros(2, device="meta")])[1] == "foreach"
    assert torch_adamw([torch.zeros(2, dtype=torch.complex64)])[1] == "foreach"
