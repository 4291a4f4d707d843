"""Megatron's router options in our router, each against an independent float64 reference:
moe_router_dtype, the load-balancing types and coefficients, the z-loss and the input jitter."""

import math

import pytest
import torch

from megatron.core.transformer.moe import moe_utils

from megatron_dsv3.configs import get_config
from megatron_dsv3.moe import router as router_mod
from megatron_dsv3.moe.router import SigmoidGroupRouter

@pytest.fixture(autouse=True)
def _restore_aux_loss_scale():
    """Backward through MoEAuxLossAutoScaler sets its class-wide scale (a 0-d tensor) when unset;
    leave it as found so later tests (Megatron's schedules set a [1] scale) are unaffected."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = saved


E, K, S, B, H = 16, 4, 6, 3, 64  # deepseek-v3-tiny: 16 experts, top-4; 3 sequences of 6 tokens


def make_router(**overrides):
    overrides.setdefault("moe_aux_loss_coeff", 0.0)
    router = SigmoidGroupRouter(get_config("deepseek-v3-tiny", **overrides))
    router.train()
    return router


def tokens(seed=0):
    return torch.randn(S * B, H, generator=torch.Generator().manual_seed(seed))


def logits64(router, x):
    return x.double() @ router.weight.detach().double().t()


# ---- independent references: plain Python over float64 numbers ------------------------------
def _ref_scores_and_map(logits, valid):
    rows = []
    for t, row in enumerate(logits.tolist()):
        s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        total = sum(s)
        p = [v / total for v in s]
        top = sorted(range(len(p)), key=lambda i: -p[i])[:K]
        ok = valid is None or bool(valid[t])
        rows.append(([v if ok else 0.0 for v in p], {i for i in top} if ok else set()))
    return rows


def ref_aux_loss(logits, valid=None):
    """Switch loss over the micro-batch: E/(k T^2) sum_i count_i * sum_t p_ti."""
    rows = _ref_scores_and_map(logits, valid)
    T = len(rows) if valid is None else int(valid.sum())
    return sum(sum(1 for _, m in rows if i in m) * sum(p[i] for p, _ in rows)
               for i in range(E)) * E / (K * T * T)


def ref_seq_aux_loss(logits, valid=None):
    """Per sequence j (tokens t*B + j): the switch loss with T_j = the sequence's (valid) tokens,
    averaged over the sequences that hold any (DeepSeek-V3's eq. 17-20, sequence by sequence)."""
    rows = _ref_scores_and_map(logits, valid)
    total, sequences = 0.0, 0
    for j in range(B):
        T = sum(1 for t in range(S) if valid is None or valid[t * B + j])
        if T == 0:
            continue
        seq = [rows[t * B + j] for t in range(S)]
        total += sum(sum(1 for _, m in seq if i in m) * sum(p[i] for p, _ in seq)
                     for i in range(E)) * E / (K * T * T)
        sequences += 1
    return total / sequences


def ref_z_loss(logits, valid=None):
    vals = []
    for t, row in enumerate(logits.tolist()):
        if valid is not None and not valid[t]:
            continue
        m = max(row)
        vals.append((m + math.log(sum(math.exp(v - m) for v in row))) ** 2)
    return sum(vals) / len(vals)


# ---- load balancing ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,ref", [("aux_loss", ref_aux_loss),
                                      ("seq_aux_loss", ref_seq_aux_loss)])
@pytest.mark.parametrize("padded", ["none", "tail", "uneven"])
def test_balancing_losses_match_closed_form(kind, ref, padded):
    router = make_router(moe_router_load_balancing_type=kind, moe_aux_loss_coeff=0.01,
                         moe_router_dtype="fp64")
    x = tokens()
    valid = None
    if padded == "tail":
        valid = torch.ones(S * B, dtype=torch.bool)
        valid[-4:] = False  # the last tokens of the sequences are padding (5, 5, 4 valid)
    elif padded == "uneven":  # sequence 0 all padding, sequence 1 two tokens, sequence 2 all
        valid = torch.ones(S, B, dtype=torch.bool)
        valid[:, 0], valid[2:, 1] = False, False
        valid = valid.reshape(-1)
    _, _, loss = router(x, seq_len=S, valid=valid)
    assert loss is not None
    expected = 0.01 * ref(logits64(router, x), valid)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert router.last_aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_balancing_losses_agree_with_megatron_functions():
    """Cross-check with megatron-core's own helpers on the same logits (group size 1)."""
    x = tokens(1)
    for kind in ("aux_loss", "seq_aux_loss"):
        router = make_router(moe_router_load_balancing_type=kind, moe_aux_loss_coeff=1.0,
                             moe_router_dtype="fp64")
        _, _, loss = router(x, seq_len=S)
        logits = logits64(router, x)
        rmap, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, K, "sigmoid")
        if kind == "aux_loss":
            ref = moe_utils.switch_load_balancing_loss_func(scores, rmap.sum(0), S * B, K, E, 1.0)
        else:
            ref = moe_utils.switch_load_balancing_loss_func(
                scores.reshape(S, -1), rmap.reshape(S, -1).sum(0), S, K, E, 1.0) / B
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6), kind


def test_balancing_types_differ_and_combine_and_none_gives_no_loss():
    x = tokens(2)
    losses = {}
    for kind in ("aux_loss", "seq_aux_loss"):
        _, _, losses[kind] = make_router(moe_router_load_balancing_type=kind,
                                         moe_aux_loss_coeff=0.1)(x, seq_len=S)
    assert losses["aux_loss"].item() != pytest.approx(losses["seq_aux_loss"].item(), rel=1e-3)
    both = make_router(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                       moe_aux_loss_coeff=[0.1, 0.1])
    assert both(x, seq_len=S)[2].item() == pytest.approx(
        (losses["aux_loss"] + losses["seq_aux_loss"]).item(), rel=1e-6)
    none = make_router(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.1)
    assert none(x, seq_len=S)[2] is None


# ---- z-loss --------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_z_loss_matches_closed_form_and_has_gradient(padded):
    router = make_router(moe_router_load_balancing_type="none", moe_z_loss_coeff=1e-3,
                         moe_router_dtype="fp64")
    x = tokens(3)
    valid = None
    if padded:
        valid = torch.ones(S * B, dtype=torch.bool)
        valid[::5] = False
    _, _, loss = router(x, seq_len=S, valid=valid)
    expected = 1e-3 * ref_z_loss(logits64(router, x), valid)
    assert router.last_z_loss.dtype == torch.float64
    assert router.last_z_loss.item() == pytest.approx(expected, rel=1e-12)  # computed in float64
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # handed on in float32
    loss.backward()
    # d/dW mean lse^2 = mean 2 lse softmax(l) x^T (closed form, float64)
    l = logits64(router, x)
    keep = torch.ones(S * B, dtype=torch.bool) if valid is None else valid
    lse = torch.logsumexp(l, -1)
    g = (2 * lse[:, None] * torch.softmax(l, -1))[keep].t() @ x.double()[keep] / keep.sum()
    torch.testing.assert_close(router.weight.grad.double(), 1e-3 * g, rtol=1e-6, atol=1e-12)


def test_z_loss_joins_the_moe_backward_pass(single_rank_world):
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.moe.layer import DeepSeekMoE

    cfg = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=1e-2)
    moe = DeepSeekMoE(cfg, get_layer_spec(cfg).submodules.moe.submodules, layer_number=2)
    moe.train()
    out, _ = moe(torch.randn(S, B, H))
    (out * 0).sum().backward()  # only the z-loss reaches the gate
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.router.last_z_loss > 0


# ---- router dtype --------------------------------------------------------------------------
def test_fp64_router_computes_in_float64(monkeypatch):
    seen = {}
    original = router_mod.route

    def spy(logits, *args, **kwargs):
        seen["logits"] = logits
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(router_mod, "route", spy)
    x = tokens(4)
    for dtype, expected in ((None, torch.float32), ("fp32", torch.float32),
                            ("fp64", torch.float64)):
        router = make_router(moe_router_dtype=dtype)
        weights, _, _ = router(x, seq_len=S)
        assert seen["logits"].dtype == expected, dtype
        assert weights.dtype == torch.float32
    torch.testing.assert_close(seen["logits"], logits64(router, x), rtol=0, atol=0)


def test_fp64_router_separates_logits_float32_cannot():
    """Two experts whose logits differ by 2^-30 (equal in float32): only the float64 router
    picks the larger one."""
    picks, logits = {}, {}
    for dtype in ("fp32", "fp64"):
        router = make_router(moe_router_dtype=dtype, moe_router_topk=1, moe_router_num_groups=1,
                             moe_router_group_topk=1)
        with torch.no_grad():
            router.weight.zero_()
            router.weight[3, 0] = 1.0
            router.weight[9, 0] = 1.0
            router.weight[9, 1] = 2.0 ** -30
        x = torch.zeros(1, H)
        x[0, 0], x[0, 1] = 1.0, 1.0
        picks[dtype] = router(x, seq_len=1)[1].item()
        logits[dtype] = x.to(router.dtype) @ router.weight.detach().to(router.dtype).t()
    assert picks["fp64"] == 9
    assert logits["fp32"][0, 3] == logits["fp32"][0, 9]  # float32 sees a tie
    assert logits["fp64"][0, 9] > logits["fp64"][0, 3]


# ---- input jitter --------------------------------------------------------------------------
def test_input_jitter_range_and_training_only():
    router = make_router(moe_input_jitter_eps=0.1)
    x = torch.ones(20000, 4)
    y = router.jitter(x)
    assert y.min() >= 0.9 and y.max() <= 1.1
    assert y.min() < 0.901 and y.max() > 1.099  # the whole range is drawn
    assert abs(y.mean().item() - 1.0) < 2e-3
    assert y.std().item() == pytest.approx(0.2 / math.sqrt(12), rel=0.05)  # uniform's std
    router.eval()
    assert torch.equal(router.jitter(x), x)
    assert torch.equal(make_router().jitter(x), x)  # unset: no noise


def test_input_jitter_changes_the_router_logits_only(monkeypatch):
    seen = []
    original = router_mod.route
    monkeypatch.setattr(router_mod, "route",
                        lambda logits, *a, **k: (seen.append(logits), original(logits, *a, **k))[1])
    router = make_router(moe_input_jitter_eps=0.05)
    x = tokens(5)
    x_before = x.clone()
    router(x, seq_len=S)
    assert torch.equal(x, x_before)  # the caller's tokens (the experts' input) are untouched
    plain = x @ router.weight.detach().t()
    diff = (seen[-1] - plain).abs().max().item()
    assert 0 < diff


def test_per_token_loss_scales_router_losses_by_the_local_tokens():
    """--calculate-per-token-loss: Megatron divides every gradient by the token count, so its
    router multiplies the aux and z losses by the local (valid) tokens; ours too."""
    x = tokens(6)
    valid = torch.ones(S * B, dtype=torch.bool)
    valid[:2] = False
    kw = dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2,
              moe_z_loss_coeff=1e-3)
    plain = make_router(**kw)(x, seq_len=S, valid=valid)[2]
    scaled = make_router(calculate_per_token_loss=True, **kw)(x, seq_len=S, valid=valid)[2]
    assert scaled.item() == pytest.approx(plain.item() * (S * B - 2), rel=1e-6)


def test_bias_and_counts_stay_float32_when_the_model_is_cast_to_bf16():
    """Megatron-LM's Float16Module calls .bfloat16() on the whole model: the aux-loss-free bias
    must still take gamma-sized steps and the counts count past 256."""
    router = make_router(moe_router_enable_expert_bias=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.5, 1.0, router.num_experts))
        router.local_tokens_per_expert.fill_(4096.0)
    bias = router.expert_bias.clone()
    router.bfloat16()
    assert router.weight.dtype == torch.bfloat16  # parameters follow the cast
    assert router.expert_bias.dtype == router.local_tokens_per_expert.dtype == torch.float32
    assert torch.equal(router.expert_bias, bias)
    router.train()
    _, indices, _ = router(tokens()[:3].bfloat16(), seq_len=3)
    counts = torch.bincount(indices.reshape(-1), minlength=router.num_experts).float()
    assert torch.equal(router.local_tokens_per_expert, 4096.0 + counts)


@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss"])
def test_a_micro_batch_of_padding_only_has_a_zero_balancing_loss(kind):
    logits = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    loss = router_mod.load_balancing_loss(kind, logits, topk=4, seq_len=4,
                                          valid=torch.zeros(8, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_token_counts_are_taken_where_autograd_records_only():
    """A forward run again without grad (Megatron's full-layer recompute) must not count its
    tokens twice."""
    router = make_router()
    router.train()
    x = tokens()
    with torch.no_grad():
        router(x, seq_len=x.shape[0])
    assert router.local_tokens_per_expert.sum() == 0
    router(x, seq_len=x.shape[0])
    assert router.local_tokens_per_expert.sum() == x.shape[0] * router.topk
