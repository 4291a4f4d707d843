"""ZeRO-1 (sharded optimizer, averaged gradients) equals AdamW on one rank over the global batch."""

import torch

from megatron_dsv3.testing.distributed import run_distributed


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    m[2].weight.allreduce = False  # treat as an "expert" parameter: its own reduction domain
    return m


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 6, generator=g) for _ in range(4)]


def _reference():
    m = _model()
    decay = [p for p in m.parameters() if p.ndim > 1]
    rest = [p for p in m.parameters() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    for x in _batches():
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in m.parameters()]


def _zero(rank, world):
    import torch.distributed as dist

    from megatron_dsv3.training.zero import ZeroOneOptimizer

    m = _model()
    group = dist.new_group(list(range(world)))
    opt = ZeroOneOptimizer(m.parameters(), torch.optim.AdamW, dp_group=group,
                           expert_dp_group=group, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95))
    for x in _batches():
        shard = x.chunk(world)[rank]  # each rank sees its part of the global batch
        m(shard).pow(2).mean().backward()
        opt.reduce_gradients()
        opt.step()
        opt.zero_grad()
    state_sizes = [s["exp_avg"].numel() for s in opt.inner.state_dict()["state"].values()]
    return [p.detach().clone() for p in m.parameters()], state_sizes


def test_zero1_matches_single_rank_adamw_and_shards_state():
    ref = _reference()
    results = run_distributed(_zero, 2)
    total = sum(p.numel() for p in ref)
    for params, state_sizes in results:
        for got, want in zip(params, ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert sum(state_sizes) <= total // 2 + 2  # each rank keeps about half of the moments


def _reduced_gradients(rank, world):
    import torch.distributed as dist

    from megatron_dsv3.training.zero import ZeroOneOptimizer

    m = _model()
    group = dist.new_group(list(range(world)))
    # experts sharded over expert parallelism with no expert-data-parallel peers (group None)
    opt = ZeroOneOptimizer(m.parameters(), torch.optim.SGD, dp_group=group, expert_dp_group=None,
                           lr=0.1)
    for p in m.parameters():
        p.grad = torch.full_like(p, float(rank + 1))
    opt.reduce_gradients()
    return {d.name: d.master.grad[:sum(d.numels) if d.shard_group is None else None].clone()
            for d in opt.domains}


def test_both_domains_are_divided_by_the_data_parallel_size():
    """Dense gradients: the mean over the data-parallel ranks ((1 + 2) / 2). Expert gradients
    already sum every data-parallel rank's tokens (the dispatch brought them), so with no
    expert-data-parallel peers they are divided by the data-parallel size too (rank r: (r+1)/2),
    not by the expert-data-parallel size (1)."""
    for rank, grads in enumerate(run_distributed(_reduced_gradients, 2)):
        dense = grads["dense"]
        assert set(dense[dense != 0].tolist()) == {1.5}
        assert set(grads["expert"].tolist()) == {(rank + 1) / 2}
