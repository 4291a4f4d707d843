"""Serving across ranks on CPU (gloo), deepseek-v3-tiny with random weights:

  ep    attention data-parallel + experts expert-parallel on 4 ranks over 2 simulated nodes:
        decode tokens/s with one and with two micro-batches per step (tokens must be identical),
        the seconds during which one micro-batch's all-to-alls were in flight while the other
        computed attention, and a timeline of one traced step (bench/out/decode_two_mb.png);
  ep-link  the same with every inter-node all-to-all held in flight for 5 ms (a slow network,
        time-dilated: on one 2-core machine the links are otherwise nearly free);
  ep2-link  EP2 over 2 nodes of 1 rank (one process per core), links held 5 ms;
  ep2-wide  the same at hidden size 1024 (GEMMs, which release the GIL, dominate);
  eplb  redundant experts: loads measured while serving, placement with 4 redundant slots,
        the busiest rank's routed rows per MoE layer before and after (same tokens), and a plot
        of per-rank rows (bench/out/eplb_rank_load.png);
  pd    prefill/decode separation under a mixed load (Poisson arrivals, 30% long prompts):
        2 colocated ranks against 1 prefill + 1 decode rank, time to first token and time per
        output token.

    python bench/inference_serving.py [ep] [ep-link] [ep2-link] [ep2-wide] [eplb] [pd]     # all: ~4 min on 2 cores
"""

import json
import os
import sys
import time

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
ENV = {"MEGATRON_DSV3_RANKS_PER_NODE": "2"}
EP = {"expert_model_parallel_size": 4}


WIDE = dict(hidden_size=1024, ffn_hidden_size=2048, moe_ffn_hidden_size=512,
            moe_shared_expert_intermediate_size=512, num_attention_heads=8, q_lora_rank=256,
            kv_lora_rank=256, qk_head_dim=64, qk_pos_emb_head_dim=32, v_head_dim=64)


def tiny_model(ep=1, wide=False):
    """deepseek-v3-tiny; `wide`: its structure at hidden size 1024 (WIDE), so that the GEMMs,
    not Python, take the time."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    torch.manual_seed(0)
    return build_model(get_config("deepseek-v3-tiny", init_method_std=0.02 if wide else 0.1,
                                  expert_model_parallel_size=ep, **(WIDE if wide else {})))


def decode_requests(n=16, new=24, seed=0):
    from megatron_dsv3.inference import Request

    g = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(1, 255, (int(l),), generator=g).tolist(), new)
            for l in torch.randint(4, 24, (n,), generator=g)]


# -- ep: one vs two micro-batches -------------------------------------------------------------
def dilate_inter_node_links(seconds):
    """Time dilation of the simulated network: an all-to-all that crosses nodes completes no
    earlier than `seconds` after its issue (its wait sleeps the rest, releasing the GIL), as
    over a slow inter-node link; intra-node transfers are left as they are."""
    from megatron_dsv3.dispatch import comm

    wait = comm.Hop.wait

    def slow_wait(self):
        issued = self._inflight[3]["start"]
        if self.links and "inter" in self.links:
            time.sleep(max(0.0, issued + seconds - time.perf_counter()))
        return wait(self)

    comm.Hop.wait = slow_wait


def _ep_rank(rank, world, micro_batches, link_s, wide):
    from megatron_dsv3.inference import InferenceEngine
    from megatron_dsv3.inference.parallel import shard

    if link_s:
        dilate_inter_node_links(link_s)
    model = tiny_model(world, wide)
    reqs = decode_requests()
    mine = [reqs[i] for i in shard(reqs, rank, world)]
    engine = InferenceEngine(model, block_size=16, max_batch_size=len(mine),
                             micro_batches=micro_batches)
    engine.generate(mine[:1])                              # warm-up
    engine.trace_steps = {engine.decode_steps + 10}
    torch.distributed.barrier()
    t = time.perf_counter()
    out = engine.generate(mine)
    seconds = time.perf_counter() - t
    return [r.tokens for r in out], seconds, list(engine.traces.values())


def bench_ep(link_s=0.0, world=4, wide=False):
    from megatron_dsv3.pipeline.overlap import plot_overlap_timeline
    from megatron_dsv3.testing.distributed import run_distributed

    rows = {}
    for mb in (1, 2):
        res = run_distributed(_ep_rank, world, args=(mb, link_s, wide),
                              env={"MEGATRON_DSV3_RANKS_PER_NODE": str(world // 2)},
                              megatron_parallel={"expert_model_parallel_size": world})
        tokens = [t for r in res for t in r[0]]
        seconds = max(r[1] for r in res)
        traces = [tr for r in res for tr in r[2]]
        rows[mb] = {"tokens": tokens, "seconds": seconds,
                    "tok_s": sum(len(t) for t in tokens) / seconds,
                    "overlap_s": sum(tr["overlap_seconds"] for tr in traces),
                    "step_s": max(max([o["end"] for o in tr["ops"]] +
                                      [a["end"] for a in tr["transfers"]]) for tr in traces)}
        if mb == 2:
            os.makedirs(OUT, exist_ok=True)
            name = (f"decode_two_mb_ep{world}{'_wide' if wide else ''}"
                    f"{'_link%gms' % (link_s * 1e3) if link_s else ''}.png")
            plot_overlap_timeline(traces[0], os.path.join(OUT, name),
                                  title="decode step, rank 0: two micro-batches; attention of "
                                        "one while the other's all-to-alls are in flight "
                                        f"({traces[0]['overlap_seconds'] * 1e3:.1f} ms)",
                                  lanes=("micro-batch 0 attention", "micro-batch 1 attention"))
    same = rows[1]["tokens"] == rows[2]["tokens"]
    for mb, r in rows.items():
        link = f"inter-node hops held {link_s * 1e3:g} ms" if link_s else "undilated links"
        size = "hidden 1024" if wide else "hidden 64"
        print(f"ep: {size}, EP{world} over 2 nodes ({link}), 16 requests x 24 tokens, "
              f"{mb} micro-batch(es): "
              f"{r['tok_s']:.0f} tok/s, traced step {r['step_s'] * 1e3:.1f} ms, a2a in flight "
              f"under the other micro-batch's attention {r['overlap_s'] * 1e3:.1f} ms "
              f"({world} ranks, one traced step each)")
    print(f"ep: tokens identical with 1 and 2 micro-batches: {same}")
    return {f"mb{mb}": {k: v for k, v in r.items() if k != "tokens"} for mb, r in rows.items()}


# -- eplb ----------------------------------------------------------------------------------------
def _eplb_rank(rank, world):
    from megatron_dsv3.inference import InferenceEngine
    from megatron_dsv3.inference.parallel import shard
    from megatron_dsv3.moe.eplb import (ExpertLoadRecorder, apply_placement, moe_layers,
                                        plan_placement)

    model = tiny_model(world)
    layers = moe_layers(model)
    reqs = decode_requests(n=24, new=16, seed=1)
    mine = [reqs[i] for i in shard(reqs, rank, world)]

    def serve():
        for m in layers:
            m.dispatcher.counters.reset()
        toks = [r.tokens for r in InferenceEngine(model, block_size=16).generate(mine)]
        rows = torch.tensor([0 if m.dispatcher.counters.tokens_per_expert is None else
                             int(m.dispatcher.counters.tokens_per_expert.sum()) for m in layers])
        everyone = [torch.zeros_like(rows) for _ in range(world)]
        torch.distributed.all_gather(everyone, rows)
        return toks, torch.stack(everyone)

    recorder = ExpertLoadRecorder(model)
    toks, before = serve()
    loads = recorder.loads(group=layers[0].dispatcher.ep_group)
    recorder.remove()
    placements = [plan_placement(l, num_groups=4, num_nodes=2, num_ranks=world, num_redundant=4)
                  for l in loads.tolist()]
    apply_placement(model, placements)
    again, after = serve()
    predicted = torch.stack([p.rank_loads(l) for p, l in zip(placements, loads.tolist())])
    return toks == again, before, after, predicted


def bench_eplb():
    from megatron_dsv3.testing.distributed import run_distributed

    res = run_distributed(_eplb_rank, 4, env=ENV, megatron_parallel=EP)
    same = all(r[0] for r in res)
    _, before, after, predicted = res[0]
    used = [l for l in range(before.shape[1]) if before[:, l].sum() > 0]
    mean = before.sum(0).double() / before.shape[0]
    for l in used:
        print(f"eplb: MoE layer {l}: busiest rank {int(before[:, l].max())} -> "
              f"{int(after[:, l].max())} rows (mean {mean[l]:.0f}; max/mean "
              f"{before[:, l].max() / mean[l]:.2f} -> {after[:, l].max() / mean[l]:.2f}; "
              f"placement predicted {predicted[l].max():.0f})")
    print(f"eplb: tokens identical before and after the placement: {same}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(used), figsize=(4 * len(used), 3), squeeze=False)
        for ax, l in zip(axes[0], used):
            x = torch.arange(before.shape[0])
            ax.bar(x - 0.2, before[:, l], 0.4, label="contiguous experts")
            ax.bar(x + 0.2, after[:, l], 0.4, label="+4 redundant (EPLB)")
            ax.axhline(mean[l], color="black", lw=0.8, ls="--", label="mean")
            ax.set_title(f"MoE layer {l}")
            ax.set_xlabel("expert-parallel rank")
            ax.set_ylabel("routed rows computed")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(OUT, exist_ok=True)
        fig.savefig(os.path.join(OUT, "eplb_rank_load.png"), dpi=110)
    except ImportError:
        pass
    return {"before": before.tolist(), "after": after.tolist(), "same_tokens": same}


# -- pd ------------------------------------------------------------------------------------------
def pd_load():
    from megatron_dsv3.inference.disaggregated import mixed_load

    return mixed_load(40, rate=12.0, vocab_size=256, seed=0, short_prompt=(4, 16),
                      long_prompt=(96, 160), new_tokens=(16, 32))


def _pd_rank(rank, world, separated):
    from megatron_dsv3.inference import InferenceEngine, Request
    from megatron_dsv3.inference.disaggregated import Roles, serve_colocated, serve_separated

    model = tiny_model()
    reqs = pd_load()
    InferenceEngine(model, block_size=16).generate([Request([1, 2, 3], 4)])   # warm-up
    start = torch.tensor([time.time() + 0.5], dtype=torch.float64)
    torch.distributed.broadcast(start, 0)          # one clock origin for all ranks
    start = float(start)
    if separated:
        out = serve_separated(model, reqs, Roles([0], [1]), block_size=16, start_time=start)
    else:
        out = serve_colocated(model, reqs, rank, world, block_size=16, start_time=start)
    return {i: (s.tokens, s.token_times) for i, s in out.items()}, start


def bench_pd():
    from megatron_dsv3.inference.disaggregated import Served, latency_summary
    from megatron_dsv3.testing.distributed import run_distributed

    reqs = pd_load()
    out, tokens = {}, {}
    for name, separated in (("colocated (2 ranks, each prefill + decode)", False),
                            ("separated (1 prefill rank + 1 decode rank)", True)):
        res = run_distributed(_pd_rank, 2, args=(separated,), megatron_parallel={})
        start = res[0][1]
        served = {i: Served(t, "", ts) for r, _ in res for i, (t, ts) in r.items()}
        tokens[separated] = {i: s.tokens for i, s in served.items()}
        s = latency_summary(reqs, served, start)
        out[name] = s
        print(f"pd: {name}: TTFT mean {s['ttft_mean'] * 1e3:.0f} ms (p90 "
              f"{s['ttft_p90'] * 1e3:.0f}), TPOT mean {s['tpot_mean'] * 1e3:.1f} ms (p90 "
              f"{s['tpot_p90'] * 1e3:.1f}), {s['requests']} requests")
    print(f"pd: 40 requests at 12/s, 30% with 96-160-token prompts; tokens identical: "
          f"{tokens[False] == tokens[True]}")
    return out


if __name__ == "__main__":
    import argparse

    parts = {"ep": bench_ep, "ep-link": lambda: bench_ep(0.005),
             "ep2-link": lambda: bench_ep(0.005, world=2),
             "ep2-wide": lambda: bench_ep(0.005, world=2, wide=True), "eplb": bench_eplb,
             "pd": bench_pd}
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", choices=list(parts), metavar="PART",
                        help=f"benchmarks to run, of {', '.join(parts)} (default: ep ep-link eplb "
                             "pd)")
    which = parser.parse_args().parts or ["ep", "ep-link", "eplb", "pd"]
    results = {}
    for name in which:
        results[name] = parts[name]()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "inference_serving.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
