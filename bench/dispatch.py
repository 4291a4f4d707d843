"""Inter-node traffic of the node-aware dispatcher against a flat all-to-all, measured.

    python bench/dispatch.py [--json] [--hidden 512] [--tokens 512] [--plot docs/img/dispatch_overlap.png]

8 gloo processes as 4 simulated nodes of 2 ranks (MEGATRON_DSV3_RANKS_PER_NODE=2), DeepSeek-V3's
routing shape (256 experts in 8 groups, top-8, 4 groups kept; hidden scaled down), a real
DeepSeekMoE layer on random tokens. Both dispatchers move the same tokens in the same run; the
bytes are counted from the splits each one actually sent (BF16 payload plus routing metadata;
dispatch and combine). Repeated with node-limited routing off (all 8 groups kept).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dsv3.testing.distributed import run_distributed  # noqa: E402


def _measure(rank, world, hidden, tokens, group_topk, chunks):
    import time

    import torch.distributed as dist

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.moe.layer import DeepSeekMoE

    cfg = get_config("deepseek-v3-tiny", hidden_size=hidden, num_moe_experts=256,
                     moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64,
                     moe_router_topk=8, moe_router_num_groups=8, moe_router_group_topk=group_topk,
                     expert_model_parallel_size=8, dsv3_dispatch_chunks=chunks,
                     moe_aux_loss_coeff=0.0, params_dtype=torch.bfloat16, bf16=True)
    x = torch.randn(tokens, 1, hidden, generator=torch.Generator().manual_seed(rank)).bfloat16()
    out = {}
    for name, dispatcher in (("node_aware", None), ("flat", FlatAllToAllDispatcher)):
        moe = DeepSeekMoE(cfg, get_layer_spec(cfg, dispatcher=dispatcher).submodules.moe.submodules,
                          layer_number=4)
        moe.eval()
        with torch.no_grad():
            moe(x)  # warm-up
            moe.dispatcher.counters.reset()
            dist.barrier()
            start = time.perf_counter()
            y, _ = moe(x)
            elapsed = time.perf_counter() - start
        c = moe.dispatcher.counters
        out[name] = {"inter_node_bytes": c.inter_node_bytes, "intra_node_bytes": c.intra_node_bytes,
                     "tokens": c.tokens, "inter_node_copies": c.inter_node_copies,
                     "seconds": elapsed, "y": y.float()}
        if name == "node_aware":
            out["timeline"] = moe.dispatcher.last_timeline
    torch.testing.assert_close(out["node_aware"].pop("y"), out["flat"].pop("y"), rtol=2e-2, atol=2e-2)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--plot", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    report = {"hidden": a.hidden, "tokens_per_rank": a.tokens, "ranks": 8, "nodes": 4}
    for label, group_topk in (("node_limited_M4_of_8_groups", 4), ("node_limited_off", 8)):
        res = run_distributed(_measure, 8, args=(a.hidden, a.tokens, group_topk, a.chunks),
                              env={"MEGATRON_DSV3_RANKS_PER_NODE": "2"},
                              megatron_parallel={"expert_model_parallel_size": 8}, timeout=900)
        row = {}
        for name in ("flat", "node_aware"):
            tokens = sum(r[name]["tokens"] for r in res)
            row[name] = {"inter_node_bytes_per_token": sum(r[name]["inter_node_bytes"] for r in res) / tokens,
                         "intra_node_bytes_per_token": sum(r[name]["intra_node_bytes"] for r in res) / tokens,
                         "inter_node_copies_per_token": sum(r[name]["inter_node_copies"] for r in res) / tokens,
                         "max_rank_seconds": max(r[name]["seconds"] for r in res)}
        row["inter_node_bytes_ratio_ours_over_flat"] = (
            row["node_aware"]["inter_node_bytes_per_token"] / row["flat"]["inter_node_bytes_per_token"])
        report[label] = row
        if a.plot and group_topk == 4:
            plot_timeline(res[0]["timeline"], a.plot)
    if a.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=1))


def plot_timeline(timeline, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = ["dispatch_inter", "dispatch_intra", "experts", "combine_intra", "combine_inter"]
    fig, ax = plt.subplots(figsize=(9, 3))
    colors = plt.get_cmap("tab10")
    for e in timeline:
        y = lanes.index(e["stage"])
        ax.barh(y, (e["end"] - e["start"]) * 1e3, left=e["start"] * 1e3, color=colors(e["chunk"]),
                edgecolor="k", lw=0.3)
        ax.text((e["start"] + e["end"]) / 2 * 1e3, y, str(e["chunk"]), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("ms (rank 0; number = chunk; transfers drawn from issue to completion)")
    ax.set_title("node-aware dispatch pipeline: transfers of later chunks in flight during expert compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
