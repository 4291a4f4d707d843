"""Inter-node traffic of the node-aware dispatcher against a flat all-to-all, measured.

    python bench/dispatch.py --json [--hidden 512] [--tokens 512] [--chunks 4]
                             [--plot docs/img/dispatch_overlap.png]

8 gloo processes, as 4 simulated nodes of 2 ranks (MEGATRON_DSV3_RANKS_PER_NODE=2) and as 8 nodes
of 1 (DeepSeek-V3's 8 nodes), run a real DeepSeekMoE layer with DeepSeek-V3's routing shape (256
experts in 8 groups, top-8, 4 groups kept; hidden scaled down) on random BF16 tokens, once with
node-limited routing and once without (all 8 groups kept). In the same run the same tokens go
through the flat all-to-all (the baseline: each (token, expert) copy straight to the expert's
rank), the node-aware dispatcher with a BF16 payload and with the FP8 payload. Bytes are what the
hops handed to torch.distributed (payload, routing metadata, combine), forward pass only; per
token = summed over ranks / tokens dispatched. `--plot` draws rank 0's chunk timeline of one
training step (forward and backward) of the node-aware dispatcher.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dsv3.cli import check_plot_path, positive_int  # noqa: E402
from megatron_dsv3.testing.distributed import run_distributed  # noqa: E402

STAGES = ("dispatch_inter", "dispatch_intra", "experts", "combine_intra", "combine_inter")


def _measure(rank, world, hidden, tokens, group_topk, chunks, timeline):
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.dispatch.flat import FlatAllToAllDispatcher
    from megatron_dsv3.dispatch.node_aware import NodeAwareDispatcher
    from megatron_dsv3.layer_specs import get_layer_spec
    from megatron_dsv3.moe.layer import DeepSeekMoE

    cfg = get_config("deepseek-v3-tiny", hidden_size=hidden, num_moe_experts=256,
                     moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64,
                     moe_router_topk=8, moe_router_num_groups=8, moe_router_group_topk=group_topk,
                     expert_model_parallel_size=8, dsv3_dispatch_chunks=chunks,
                     moe_aux_loss_coeff=0.0, params_dtype=torch.bfloat16, bf16=True)
    x = torch.randn(tokens, 1, hidden, generator=torch.Generator().manual_seed(rank)).bfloat16()
    def fp8(c, g):  # the node-aware dispatcher with the config's routing and an FP8 payload
        return NodeAwareDispatcher(c.num_moe_experts, g, hidden_size=c.hidden_size,
                                   num_groups=c.moe_router_num_groups,
                                   group_topk=c.moe_router_group_topk,
                                   chunks=c.dsv3_dispatch_chunks, fp8_payload=True)

    out, ys = {}, {}
    for name, dispatcher in (("flat", FlatAllToAllDispatcher), ("node_aware", None),
                             ("node_aware_fp8", fp8)):
        moe = DeepSeekMoE(cfg, get_layer_spec(cfg, dispatcher=dispatcher).submodules.moe.submodules,
                          layer_number=4)
        moe.eval()
        with torch.no_grad():
            ys[name] = moe(x)[0].float()
        c = moe.dispatcher.counters
        out[name] = {"inter_node_bytes": c.inter_node_bytes, "intra_node_bytes": c.intra_node_bytes,
                     "tokens": c.tokens, "inter_node_copies": c.inter_node_copies,
                     "max_nodes_per_token": c.max_nodes_per_token,
                     "tokens_over_node_limit": c.tokens_over_node_limit}
        if name == "node_aware" and timeline:
            moe.train()
            xg = x.clone().requires_grad_()
            y, _ = moe(xg)
            y.float().square().mean().backward()
            out["timeline"] = moe.dispatcher.last_timeline
    # same layer, same weights: the dispatchers must agree (BF16 rounding of the combine)
    torch.testing.assert_close(ys["node_aware"], ys["flat"], rtol=2e-2, atol=2e-2)
    return out


def _per_token(res, name, key):
    return sum(r[name][key] for r in res) / sum(r[name]["tokens"] for r in res)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=positive_int, default=512)
    p.add_argument("--tokens", type=positive_int, default=512, help="tokens per rank")
    p.add_argument("--chunks", type=positive_int, default=4)
    p.add_argument("--plot", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.plot:
        try:
            check_plot_path("--plot", a.plot)
        except ValueError as error:
            p.error(str(error))
    report = {"hidden": a.hidden, "tokens_per_rank": a.tokens, "ranks": 8, "experts": 256,
              "topk": 8, "groups": 8}
    for nodes, rpn in ((4, 2), (8, 1)):
        for label, group_topk in (("node_limited", 4), ("node_limited_off", 8)):
            want_timeline = bool(a.plot) and nodes == 4 and group_topk == 4
            res = run_distributed(_measure, 8, args=(a.hidden, a.tokens, group_topk, a.chunks,
                                                     want_timeline),
                                  env={"MEGATRON_DSV3_RANKS_PER_NODE": str(rpn)},
                                  megatron_parallel={"expert_model_parallel_size": 8}, timeout=900)
            row = {"group_topk": group_topk}
            for name in ("flat", "node_aware", "node_aware_fp8"):
                row[name] = {
                    "inter_node_bytes_per_token": _per_token(res, name, "inter_node_bytes"),
                    "intra_node_bytes_per_token": _per_token(res, name, "intra_node_bytes"),
                    "inter_node_copies_per_token": _per_token(res, name, "inter_node_copies")}
                if name != "flat":  # the node limit is the node-aware dispatcher's to check
                    row[name]["max_nodes_per_token"] = max(
                        r[name]["max_nodes_per_token"] for r in res)
                    row[name]["tokens_over_node_limit"] = sum(
                        r[name]["tokens_over_node_limit"] for r in res)
            flat = row["flat"]["inter_node_bytes_per_token"]
            row["inter_node_bytes_ratio_ours_over_flat"] = (
                row["node_aware"]["inter_node_bytes_per_token"] / flat)
            row["inter_node_bytes_ratio_ours_fp8_over_flat"] = (
                row["node_aware_fp8"]["inter_node_bytes_per_token"] / flat)
            report[f"{nodes}_nodes_x_{rpn}/{label}"] = row
            if want_timeline:
                plot_timeline(res[0]["timeline"], a.plot, a.chunks)
            print(f"{nodes} nodes x {rpn}, group_topk {group_topk}: inter-node bytes/token "
                  f"flat {flat:.0f}, ours {row['node_aware']['inter_node_bytes_per_token']:.0f} "
                  f"(x{row['inter_node_bytes_ratio_ours_over_flat']:.3f}), ours FP8 "
                  f"{row['node_aware_fp8']['inter_node_bytes_per_token']:.0f}", file=sys.stderr)
    print(json.dumps(report) if a.json else json.dumps(report, indent=1))


def plot_timeline(timeline, path, chunks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(e["start"] for e in timeline)
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.2))
    for ax, phase in zip(axes, ("forward", "backward")):
        lanes = STAGES if phase == "forward" else STAGES[::-1]
        for e in timeline:
            if e["pass"] != phase:
                continue
            y = lanes.index(e["stage"])
            start, end, waited = ((e.get(k, e["end"]) - t0) * 1e3 for k in ("start", "end", "waited"))
            ax.barh(y, end - start, left=start, color=colors(e["chunk"]), edgecolor="k", lw=0.3)
            if waited > end:  # arrived, not yet consumed by the pipeline
                ax.plot([end, waited], [y, y], color=colors(e["chunk"]), lw=1, ls=":")
            ax.text(start, y, str(e["chunk"]), ha="left", va="center", fontsize=7)
        ax.set_yticks(range(len(lanes)), [f"{s}" for s in lanes])
        ax.invert_yaxis()
        ax.set_title(f"{phase}: bars = transfer issued -> completed (experts: computing), "
                     f"dotted = waiting to be consumed", fontsize=9)
    axes[1].set_xlabel(f"ms since the first transfer (rank 0 of 8, 4 simulated nodes; {chunks} "
                       f"chunks, colour/number = chunk)")
    fig.suptitle("node-aware dispatch: one chunk's inter-node hop, another's intra-node hop and "
                 "a third's experts at once", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
