"""The pool of reused CPU memory (megatron_dsv3.workspace): a storage is handed out again only
when nothing refers to it, never while a tensor, a view, a saved-for-backward tensor or a
gradient still uses it; small tensors bypass it; a training step of the routed experts takes its
large tensors from it and computes the same numbers as without it."""

import threading

import torch

from megatron_dsv3 import workspace
from megatron_dsv3.workspace import StoragePool


def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_a_storage_is_reused_only_once_nothing_refers_to_it():
    pool = StoragePool(min_bytes=1024, max_bytes=1 << 20)
    a = pool.empty((64, 16), torch.float32, "cpu")
    a.fill_(1.0)
    view = a[3:]
    del a
    b = pool.empty((64, 16), torch.float32, "cpu")  # the view still holds the first storage
    assert _ptr(b) != _ptr(view) and pool.reused == 0
    first = _ptr(view)
    del view
    c = pool.empty((16, 64), torch.float32, "cpu")  # same bytes, any shape
    assert _ptr(c) == first and pool.reused == 1 and c.shape == (16, 64)

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x

    kept = c.requires_grad_()
    out = Keep.apply(kept)
    held = _ptr(kept)
    del kept, c  # only the graph's saved tensor holds it now
    d = pool.empty((64, 16), torch.float32, "cpu")
    assert _ptr(d) != held
    del out  # the graph (and its saved tensor) goes
    assert _ptr(pool.empty((64, 16), torch.float32, "cpu")) == held


def test_a_storage_resized_by_its_user_leaves_the_pool():
    """Selective recomputation frees an output's memory with untyped_storage().resize_(0); if
    that tensor dies before being recomputed, its storage must not come back with 0 bytes."""
    pool = StoragePool(min_bytes=1024, max_bytes=1 << 20)
    a = pool.empty((64, 16), torch.float32, "cpu")
    a.untyped_storage().resize_(0)
    del a
    b = pool.empty((64, 16), torch.float32, "cpu")
    b.fill_(2.0)  # a usable tensor of the full size
    assert b.untyped_storage().nbytes() == 64 * 16 * 4 and pool.pooled_bytes == 64 * 16 * 4
    assert pool.reused == 0


def test_small_tensors_and_the_cap_bypass_the_pool():
    pool = StoragePool(min_bytes=4096, max_bytes=8192)
    small = pool.empty((8,), torch.float32, "cpu")
    assert small.numel() == 8 and pool.pooled_bytes == 0
    a, b = pool.empty((1024,), torch.float32, "cpu"), pool.empty((1024,), torch.float32, "cpu")
    assert pool.pooled_bytes == 8192
    c = pool.empty((1024,), torch.float32, "cpu")  # past the cap: plain memory
    assert pool.pooled_bytes == 8192 and len({_ptr(a), _ptr(b), _ptr(c)}) == 3


def test_two_threads_never_get_the_same_storage():
    pool = StoragePool(min_bytes=1024, max_bytes=64 << 20)
    seen, errors = [], []

    def work():
        try:
            for _ in range(200):
                t = pool.empty((512,), torch.float32, "cpu")
                t.fill_(threading.get_ident() % 1000)
                seen.append(t)  # kept: every storage handed out must be distinct
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({_ptr(t) for t in seen}) == len(seen) == 400


def test_routed_experts_step_uses_the_pool_and_matches_plain_memory():
    """A DeepSeekMoE layer's forward and backward twice (the second reuses the first's
    storages) with the pool, once without it, and once with the pool and selective
    recomputation of the SwiGLU outputs (which frees and refills pooled memory): identical
    outputs and gradients."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.moe.layer import DeepSeekMoE

    runs = [(True, None), (True, None), (False, None), (True, ["moe_act"])]
    torch.manual_seed(0)
    x = None
    saved = (workspace.POOL.enabled, workspace.POOL.min_bytes)
    results = []
    try:
        workspace.POOL.min_bytes = 1024  # tiny model: pool everything
        for enabled, recompute in runs:
            extra = {} if recompute is None else dict(recompute_granularity="selective",
                                                      recompute_modules=recompute)
            cfg = get_config("deepseek-v3-tiny", moe_aux_loss_coeff=0.0, **extra)
            torch.manual_seed(1)
            moe = DeepSeekMoE(cfg, get_layer_spec(cfg).submodules.moe.submodules, layer_number=2)
            if x is None:
                x = torch.randn(64, 8, cfg.hidden_size)
            workspace.POOL.enabled = enabled
            before = workspace.POOL.reused
            for _ in range(2):  # the second pass meets the first one's freed (or resized) memory
                xi = x.clone().requires_grad_()
                out, _ = moe(xi)
                out.square().sum().backward()
                grads = [p.grad.clone() for p in moe.parameters()]
                moe.zero_grad(set_to_none=True)
            results.append((out.detach(), xi.grad, grads, workspace.POOL.reused - before))
    finally:
        workspace.POOL.enabled, workspace.POOL.min_bytes = saved
    assert results[0][3] > 0 and results[3][3] > 0  # pooled storages were handed out again
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        assert all(torch.equal(a, b) for a, b in zip(results[0][2], other[2]))
