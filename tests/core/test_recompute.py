"""Selective recomputation: bit-identical gradients, and the recomputed outputs are really freed."""

import torch

from megatron_dsv3.configs import get_config
from megatron_dsv3.core import recompute
from megatron_dsv3.model import build_model

MODULES = ["layernorm", "mla_up_proj", "moe_act"]


def _grads(config, ids, pos):
    torch.manual_seed(0)
    model = build_model(config)
    loss = model(ids, pos, None, labels=ids).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_selective_recompute_gives_identical_gradients(single_rank_world):
    ids = torch.randint(0, 256, (2, 24))
    pos = torch.arange(24).expand(2, 24)
    base_loss, base = _grads(get_config("deepseek-v3-tiny"), ids, pos)
    cfg = get_config("deepseek-v3-tiny", recompute_granularity="selective",
                     recompute_modules=MODULES)
    loss, grads = _grads(cfg, ids, pos)
    assert torch.equal(loss, base_loss)
    assert grads.keys() == base.keys()
    for name in base:
        assert torch.equal(grads[name], base[name]), name


def test_recompute_around_the_blocked_causal_core_gives_identical_gradients(single_rank_world,
                                                                           monkeypatch):
    """The blocked causal attention keeps views of q, k and v, whose memory the 'mla_up_proj'
    region frees after forward and refills before the core's backward; with 'core_attn' the core
    itself runs again. Gradients bit-identical to the same blocked path without recomputation."""
    from megatron_dsv3.attention import core

    monkeypatch.setattr(core.SDPAttention, "causal_block", 8)
    monkeypatch.setattr(core.SDPAttention, "blocked_min_head_dim", 1)
    calls = []
    apply = core._BlockedCausalAttention.apply
    monkeypatch.setattr(core._BlockedCausalAttention, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    ids = torch.randint(0, 256, (2, 24))
    pos = torch.arange(24).expand(2, 24)
    base_loss, base = _grads(get_config("deepseek-v3-tiny"), ids, pos)
    for modules in (["mla_up_proj"], ["mla_up_proj", "core_attn"]):
        cfg = get_config("deepseek-v3-tiny", recompute_granularity="selective",
                         recompute_modules=modules)
        loss, grads = _grads(cfg, ids, pos)
        assert torch.equal(loss, base_loss)
        for name in base:
            assert torch.equal(grads[name], base[name]), (modules, name)
    # every layer's attention (3 layers + MTP) blocked: without recomputation, with
    # mla_up_proj, and twice (forward, recomputation) with core_attn
    assert len(calls) == 4 + 4 + 2 * 4


def test_recomputed_outputs_are_released_after_forward(single_rank_world, monkeypatch):
    released = []
    original = recompute.DiscardedOutput.release

    def spy(self, consumer_output):
        original(self, consumer_output)
        released.append(self.outputs)

    monkeypatch.setattr(recompute.DiscardedOutput, "release", spy)
    cfg = get_config("deepseek-v3-tiny", recompute_granularity="selective",
                     recompute_modules=MODULES)
    model = build_model(cfg)
    ids = torch.randint(0, 256, (2, 16))
    loss = model(ids, torch.arange(16).expand(2, 16), None, labels=ids).mean()
    # 4 layers (3 + MTP) x 2 norms + 4 MLA up-projections + 4 SwiGLUs (dense/shared) + 3 experts
    assert len(released) >= 4 * 2 + 4 + 4 + 3
    assert all(t.untyped_storage().size() == 0 for outs in released for t in outs)
    loss.backward()  # recomputation restores them in time for backward
    assert all(t.untyped_storage().size() > 0 for outs in released for t in outs if outs)


def test_recompute_is_off_unless_selected(single_rank_world):
    cfg = get_config("deepseek-v3-tiny", recompute_granularity="selective",
                     recompute_modules=["layernorm"])
    assert recompute.recompute_enabled(cfg, "layernorm")
    assert not recompute.recompute_enabled(cfg, "moe_act")
    assert not recompute.recompute_enabled(get_config("deepseek-v3-tiny"), "layernorm")


def test_recompute_below_frozen_layers_keeps_every_gradient(single_rank_world):
    """Fine-tuning with the embedding and the first layer's attention frozen: the regions'
    inputs need no gradient. The 'layernorm' region then failed in backward (nothing saved to
    recompute from) and the 'mlp' checkpoint cut the MLP's weights off their gradients (its output
    carried no graph); such regions now run plainly, with the gradients of no recompute."""
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(8).expand(2, 8)
    trained = ("decoder.layers.0.mlp.", "decoder.layers.0.pre_mlp_layernorm.", "output_layer")

    def grads(**kw):
        torch.manual_seed(0)
        model = build_model(get_config("deepseek-v3-tiny", **kw))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(trained))
        model(ids, pos, None, labels=ids).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    base = grads()
    assert len(base) >= 4 and all(g is not None for g in base.values())
    for modules in (["layernorm"], ["mlp"], MODULES + ["mlp"]):
        got = grads(recompute_granularity="selective", recompute_modules=modules)
        assert got.keys() == base.keys()
        for name, g in got.items():
            assert g is not None and torch.equal(g, base[name]), (modules, name)


def test_checkpointed_restores_megatrons_rng_tracker_for_dropout_drawn_there(monkeypatch):
    """TE's (and Megatron's) attention core draws its dropout inside
    get_cuda_rng_tracker().fork(); the checkpoint restored only the default generators, so the
    recomputation drew another mask (gradients of another forward) and the tracker advanced
    twice. With the tracker's states restored, gradients and the tracker's final state equal
    those of the run without recomputation."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from megatron.core.tensor_parallel import random

    from megatron_dsv3.testing.megatron_cpu import _CpuRNGStatesTracker

    tracker = _CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 4321)
    monkeypatch.setattr(random, "_CUDA_RNG_STATE_TRACKER", tracker)
    monkeypatch.setattr(random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))

    def core(x):  # as TE's DotProductAttention with attention_dropout > 0
        p = torch.softmax(x @ w, -1)
        with random.get_cuda_rng_tracker().fork():
            p = F.dropout(p, 0.5, training=True)
        return p @ w.t()

    def run(fn):
        tracker.set_states({"model-parallel-rng": torch.Generator().manual_seed(42).get_state()})
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        y = fn(x)
        (y * torch.arange(16.0)).sum().backward()
        return y.detach(), x.grad, tracker.get_states()["model-parallel-rng"]

    config = SimpleNamespace(recompute_granularity="selective", recompute_modules=["core_attn"])
    plain = run(core)
    checkpointed = run(recompute.checkpointed(config, "core_attn", core))
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))


def test_a_checkpointed_forward_without_backward_is_freed_without_the_garbage_collector():
    """A grad-enabled forward that is never back-propagated (e.g. an evaluation outside
    no_grad) is freed when its output goes, not only when the garbage collector runs."""
    import gc
    import weakref
    from types import SimpleNamespace

    config = SimpleNamespace(recompute_granularity="selective", recompute_modules=["core_attn"])
    w = torch.randn(4, 4, requires_grad=True)
    fn = recompute.checkpointed(config, "core_attn", lambda x: (x @ w, None))
    gc.disable()
    try:
        out, _ = fn(torch.randn(3, 4, requires_grad=True))
        alive = weakref.ref(out)
        del out
        assert alive() is None
    finally:
        gc.enable()
