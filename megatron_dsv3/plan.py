"""Parallel-layout and memory planner for DeepSeek-V3 training.

    python -m megatron_dsv3.plan --preset deepseek-v3 --nodes 256 --gpus-per-node 8 \
        --tp 1 --pp 16 --ep 64 --schedule dualpipev --mtp 1 --fp8 --bf16-moments --zero1

What it does, in order:
  1. validates the layout (world = nodes x gpus; TP*PP | world; EP | DP*TP, Megatron's rule that
     expert parallelism lives inside data parallelism x tensor parallelism; experts % EP; EP spans
     >= M = moe_router_group_topk nodes; schedule constraints) and refuses with the flag's name and
     the allowed values;
  2. prints per pipeline rank the global layer numbers of each chunk (StageLayers: DualPipeV's V,
     rank 0 holds the first and the last stage, so embedding, head and MTP);
  3. counts parameters from the model built on the meta device (no hand formula): the total, the
     MTP module, activated per token, and per pipeline rank;
  4. per-GPU memory: BF16 weights (+ FP8 weight copies with --fp8), FP32 gradients, FP32 master
     weights and Adam moments (FP32 or BF16) sharded over DP by ZeRO-1 (expert parameters over the
     expert-data-parallel group), and activations per micro-batch times the peak number of
     micro-batches in flight, counted by replaying our schedule tables (pipeline/schedules.py);
  5. pipeline bubble from the schedule simulator and inter-node expert all-to-all bytes per
     micro-batch.

`--placement-only` stops after step 2 (no model is built); `--json` prints one JSON object.
Activation bytes are an estimate (stated per tensor in `activation_bytes_per_token`); parameter
counts and the in-flight counts are exact for the model and the schedule.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_dsv3.cli import non_negative_int, positive_float, positive_int
from megatron_dsv3.configs import layout as layout_rules
from megatron_dsv3.configs.layout import FLAGS, LayoutError

GiB = 1024 ** 3
SCHEDULE_CHOICES = ("1f1b", "interleaved", "dualpipe", "dualpipev")
RECOMPUTE_MODULES = ("layernorm", "mla_up_proj", "moe_act")


# A layout that does not divide or does not fit; the message names the flag. The rules are
# megatron_dsv3.configs.layout's (shared with the converter, the trainer and pretrain_gpt).
PlanError = LayoutError


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    ep: int
    schedule: str
    first: Optional[int] = None  # --decoder-first-pipeline-num-layers (pipeline rank 0)
    last: Optional[int] = None  # --decoder-last-pipeline-num-layers (pipeline rank PP-1)
    vpp: Optional[int] = None  # --virtual-pipeline-model-parallel-size (interleaved)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        # expert tensor parallel size 1: experts are sharded EP ways inside DP x TP
        return self.dp * self.tp // self.ep

    @property
    def stages(self) -> int:
        return layout_rules.num_stages(self.schedule, self.pp, self.vpp)


def validate(lay: Layout, config, *, mtp: int, micro_batches: Optional[int] = None) -> None:
    """PlanError naming the flag and its allowed values."""
    from megatron_dsv3.pipeline.schedules import check

    for flag, v in (("--nodes", lay.nodes), ("--gpus-per-node", lay.gpus_per_node)):
        if v < 1:
            raise PlanError(f"{flag} {v} is invalid: allowed values are >= 1")
    layout_rules.check_layout(config, tp=lay.tp, pp=lay.pp, ep=lay.ep, schedule=lay.schedule,
                              first=lay.first, last=lay.last, vpp=lay.vpp, mtp=mtp,
                              world=lay.world, gpus_per_node=lay.gpus_per_node,
                              world_source=f"--nodes {lay.nodes} x --gpus-per-node "
                                           f"{lay.gpus_per_node}",
                              names=FLAGS, schedules=SCHEDULE_CHOICES)
    if micro_batches is not None:
        try:
            check(lay.schedule, lay.pp, micro_batches, lay.vpp or 2)
        except ValueError as e:
            raise PlanError(f"--global-batch-size / (--micro-batch-size x DP) = {micro_batches} "
                            f"micro-batches per step: {e}") from None


def placement(lay: Layout, num_layers: int) -> Dict[int, List[List[int]]]:
    """{pp rank: [global layer numbers of each chunk]} as the model builder places them: our
    StageLayers under DualPipe(V), Megatron's split (get_transformer_layer_offset) otherwise."""
    from megatron_dsv3.pipeline.schedules import layout

    ranges = layout_rules.stage_layer_ranges(num_layers, lay.schedule, lay.pp, lay.first,
                                             lay.last, lay.vpp, names=FLAGS)
    stages = layout(lay.schedule, lay.pp, lay.vpp or 1)
    return {r: [list(range(*ranges[stages.stage(r, c)])) for c in range(stages.chunks)]
            for r in range(lay.pp)}


def holders(lay: Layout) -> Dict[str, int]:
    """Pipeline rank holding the embedding, the output head and the MTP module."""
    from megatron_dsv3.pipeline.schedules import layout

    if lay.schedule in ("dualpipev", "dualpipe"):
        last_rank = layout(lay.schedule, lay.pp).place(layout(lay.schedule, lay.pp).stages - 1)[0]
    else:
        last_rank = lay.pp - 1
    return {"embedding": 0, "output_head": last_rank, "mtp": last_rank}


# --- parameter counts from the built model ---------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def count_parameters(config, progress: bool = False) -> Dict:
    """Parameter counts of the whole model built on the meta device (TP = EP = 1), grouped:
    per global layer (dense part / routed experts), embedding, head, final norm, MTP."""
    import torch

    from megatron_dsv3.model import build_model
    from megatron_dsv3.world import init_single_process

    init_single_process()
    done = threading.Event()
    if progress:
        def tick():
            t0 = time.time()
            while not done.wait(3.0):
                print(f"  building {config.num_layers}-layer model on the meta device ... "
                      f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        threading.Thread(target=tick, daemon=True).start()
    try:
        with torch.device("meta"):
            model = build_model(config)
    finally:
        done.set()
    layers = {i: {"dense": 0, "experts": 0} for i in range(1, config.num_layers + 1)}
    out = {"embedding": 0, "output_head": 0, "final_norm": 0, "mtp_dense": 0, "mtp_experts": 0,
           "replicated_small": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        routed = ".experts." in name
        if "layernorm" in name or name.endswith("norm.weight") or ".router." in name:
            out["replicated_small"] += n  # not split by TP
        if name.startswith("mtp."):
            out["mtp_experts" if routed else "mtp_dense"] += n
        elif name.startswith("embedding."):
            out["embedding"] += n
        elif name.startswith("output_layer."):
            out["output_head"] += n
        elif name.startswith("decoder.final_layernorm"):
            out["final_norm"] += n
        else:
            m = _LAYER.match(name)
            if m is None:
                raise RuntimeError(f"parameter {name} belongs to no known part")
            layers[int(m.group(1)) + 1]["experts" if routed else "dense"] += n
    out["layers"] = layers
    main = (out["embedding"] + out["output_head"] + out["final_norm"]
            + sum(v["dense"] + v["experts"] for v in layers.values()))
    routed_all = sum(v["experts"] for v in layers.values())
    frac = (config.moe_router_topk / config.num_moe_experts) if config.num_moe_experts else 1.0
    out["total_main"] = main
    out["total_mtp"] = out["mtp_dense"] + out["mtp_experts"]
    # activated per token: every weight a token's forward multiplies by; the embedding is a
    # lookup of one row (DeepSeek-V3's 37B counts it out)
    out["activated_main"] = round(main - out["embedding"] - routed_all + routed_all * frac)
    out["activated_mtp"] = round(out["mtp_dense"] + out["mtp_experts"] * frac)
    return out


# --- activations and in-flight micro-batches -------------------------------------------------

def activation_bytes_per_token(config, layer: int, recompute: List[str], tp: int = 1) -> Dict:
    """Estimated bytes saved for backward per token of one layer (BF16 = 2 bytes per value).
    Tensors recomputed by --recompute-modules are not saved. Split by TP where the tensor is."""
    from megatron_dsv3.configs import is_moe_layer

    h, n = config.hidden_size, config.num_attention_heads
    dqk, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    ql, kvl = config.q_lora_rank or 0, config.kv_lora_rank
    parts = {
        "attn_input": h,  # residual / norm input
        "attn_norm_out": 0 if "layernorm" in recompute else h,
        "mla_latents": ql + kvl + dr,  # c_q, c_kv, k_rope (inputs of the up-projections)
        "mla_qkv": 0 if "mla_up_proj" in recompute else (n * (dqk + dr) * 2 + n * dv) // tp,
        "attn_out": n * dv // tp,  # core attention output = linear_proj input
        "mlp_input": h,
        "mlp_norm_out": 0 if "layernorm" in recompute else h,
    }
    if is_moe_layer(config, layer):
        k, f, fs = config.moe_router_topk, config.moe_ffn_hidden_size, \
            config.moe_shared_expert_intermediate_size or 0
        parts["router_probs"] = 2 * config.num_moe_experts  # fp32 scores
        parts["experts_in"] = k * h  # each token once per chosen expert
        parts["experts_fc1_out"] = k * 2 * f
        parts["experts_act_out"] = 0 if "moe_act" in recompute else k * f
        parts["shared_fc1_out"] = 2 * fs // tp
        parts["shared_act_out"] = 0 if "moe_act" in recompute else fs // tp
    else:
        f = config.ffn_hidden_size
        parts["fc1_out"] = 2 * f // tp
        parts["act_out"] = f // tp
    return {k: 2 * v for k, v in parts.items()}


def peak_in_flight(schedule: str, pp: int, micro_batches: int,
                   chunks: int = 2) -> List[Dict[int, int]]:
    """Per rank, {chunk: micro-batches whose forward activations of that chunk are held} at the
    rank's peak, from replaying our schedule tables (F adds, B releases; FB = F then B)."""
    from megatron_dsv3.pipeline.schedules import build

    name = "1f1b" if schedule == "1f1b" else schedule
    out = []
    for ops in build(name, pp, micro_batches, chunks):
        live: Dict[int, int] = {}
        best, best_total = {}, -1
        for op in ops:
            halves = ([("F", op.chunk), ("B", op.chunk2)] if op.kind == "FB"
                      else [(op.kind, op.chunk)])
            for kind, c in halves:
                c = max(c, 0)
                if kind == "F":
                    live[c] = live.get(c, 0) + 1
                    if sum(live.values()) > best_total:
                        best_total, best = sum(live.values()), dict(live)
                elif kind == "B":
                    live[c] -= 1
        out.append(best)
    return out


# --- the plan ----------------------------------------------------------------------------------

def plan(args) -> Dict:
    from megatron_dsv3.configs import get_config

    overrides = dict(perform_initialization=False, use_cpu_initialization=True)
    overrides["mtp_num_layers"] = args.mtp or None
    for field in ("num_layers", "num_moe_experts", "moe_router_topk", "moe_router_num_groups",
                  "moe_router_group_topk"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.num_layers is not None and args.first_k_dense is None:
        overrides["first_k_dense_replace"] = min(args.num_layers,
                                                 get_config(args.preset).moe_layer_freq.index(1))
    if args.first_k_dense is not None:
        overrides["first_k_dense_replace"] = args.first_k_dense
    config = get_config(args.preset, **overrides)
    lay = Layout(args.nodes, args.gpus_per_node, args.tp, args.pp, args.ep, args.schedule,
                 args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers,
                 args.vpp)
    validate(lay, config, mtp=args.mtp)  # (DP below needs valid sizes)
    micro_batches = None
    if args.global_batch_size:
        per = args.micro_batch_size * lay.dp
        if args.global_batch_size % per:
            raise PlanError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                            f"--micro-batch-size x DP = {per}")
        micro_batches = args.global_batch_size // per
        validate(lay, config, mtp=args.mtp, micro_batches=micro_batches)
    table = placement(lay, config.num_layers)
    result = {
        "preset": args.preset,
        "layout": {"world_size": lay.world, "nodes": lay.nodes, "gpus_per_node": lay.gpus_per_node,
                   "tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "dp": lay.dp,
                   "expert_dp": lay.expert_dp, "ep_nodes": max(1, lay.ep // lay.gpus_per_node),
                   "schedule": lay.schedule, "stages": lay.stages, "num_layers": config.num_layers,
                   "mtp_num_layers": args.mtp,
                   "decoder_first_pipeline_num_layers": lay.first,
                   "decoder_last_pipeline_num_layers": lay.last,
                   "virtual_pipeline_model_parallel_size": lay.vpp},
        "placement": {str(r): chunks for r, chunks in table.items()},
        "holders": holders(lay),
    }
    if args.placement_only:
        return result

    counts = count_parameters(config, progress=not args.json)
    recompute = [] if args.recompute == "none" else (
        list(RECOMPUTE_MODULES) if args.recompute == "selective" else args.recompute.split(","))
    if micro_batches is None:
        micro_batches = 2 * lay.pp if lay.schedule in ("dualpipe", "dualpipev") else lay.pp
    in_flight = peak_in_flight(lay.schedule, lay.pp, micro_batches, lay.vpp or 2)
    tokens = args.micro_batch_size * args.seq_length
    hold = holders(lay)
    small = counts["replicated_small"]
    total_all = counts["total_main"] + counts["total_mtp"]
    small_frac = small / total_all
    # (rank -> chunks) holding a last stage, where the output head runs: DualPipe has one per
    # direction
    from megatron_dsv3.pipeline.schedules import layout as stage_layout

    stages = stage_layout(lay.schedule, lay.pp, lay.vpp or 1)
    head_chunks: Dict[int, set] = {}
    for direction in range(2 if lay.schedule == "dualpipe" else 1):
        rank, chunk = stages.place(stages.stages - 1, direction)
        head_chunks.setdefault(rank, set()).add(chunk)
    # the final norm: with the output head; with MTP, with the last decoder layer instead
    # (Megatron builds it in the block that holds that layer; DualPipeV can leave the last
    # stage, the head's, without layers)
    norm_ranks = {hold["output_head"]}
    if args.mtp and lay.schedule != "dualpipe":
        norm_ranks = {r for r, chunks in table.items()  # (layer numbers from 1)
                      if any(config.num_layers in layers for layers in chunks)}
    per_rank = []
    for r, chunks in table.items():
        dense = exp = 0
        high_precision = 0  # dense parameters the FP8 recipe keeps in BF16 (embedding, head)
        for layer_list in chunks:
            for g in layer_list:
                dense += counts["layers"][g]["dense"]
                exp += counts["layers"][g]["experts"]
        if hold["embedding"] == r:
            high_precision += counts["embedding"]
        if hold["output_head"] == r:
            high_precision += counts["output_head"]
        if r in norm_ranks:
            high_precision += counts["final_norm"]
        if lay.schedule == "dualpipe" and r in (0, lay.pp - 1):
            # each direction has its own first and last stage: rank P-1 also holds direction 1's
            # embedding, rank 0 direction 1's final norm and head
            high_precision += (counts["output_head"] + counts["final_norm"] if r == 0
                               else counts["embedding"])
        if args.mtp and hold["mtp"] == r:
            dense += counts["mtp_dense"]
            exp += counts["mtp_experts"]
            if lay.schedule == "dualpipev" or hold["embedding"] != r:
                # the MTP layer reads the embedding: its stage holds a copy (Megatron builds one
                # on an MTP stage that is not the first; under DualPipeV megatron_dsv3.pretrain_gpt
                # unties rank 0's for Megatron's DDP; the copies' gradients are summed)
                high_precision += counts["embedding"]
        dense += high_precision
        dense_gpu = dense / lay.tp  # norms/router replicated: ~small_frac, ignored in the split
        exp_gpu = exp / lay.ep
        params_gpu = dense_gpu + exp_gpu
        moment_bytes = 2 if args.bf16_moments else 4
        opt_per_param = 4 + 2 * moment_bytes  # FP32 master + exp_avg + exp_avg_sq
        shard_d = lay.dp if args.zero1 else 1
        shard_e = lay.expert_dp if args.zero1 else 1
        mem = {
            "weights_bf16": 2 * params_gpu,
            # FP8 copies of the GEMM weights (the recipe keeps embedding, head, norms and router
            # in BF16; norms and router, ~0.01% of a layer, are counted in)
            "weights_fp8_copy": ((params_gpu - high_precision / lay.tp) if args.fp8 else 0),
            "grads_fp32": 4 * params_gpu,
            "optimizer": opt_per_param * (dense_gpu / shard_d + exp_gpu / shard_e),
        }
        act_layer = {}
        act = 0
        for c, n_mb in in_flight[r].items():
            for g in chunks[c] if c < len(chunks) else []:
                b = sum(activation_bytes_per_token(config, g, recompute, lay.tp).values())
                act_layer[g] = b
                act += n_mb * b * tokens
            if c in head_chunks.get(r, ()):
                # the MTP layers (MoE layers) and the float32 logits each output head keeps for
                # its cross-entropy backward (main head and one per MTP depth), per micro-batch
                moe = sum(activation_bytes_per_token(config, config.num_layers, recompute,
                                                     lay.tp).values())
                heads = 1 + (args.mtp or 0)
                act += n_mb * tokens * ((args.mtp or 0) * moe
                                        + heads * 4 * config.vocab_size / lay.tp)
        mem["activations"] = act
        mem["total"] = sum(mem.values())
        per_rank.append({"pp_rank": r, "params_per_gpu": round(params_gpu),
                         "dense_params_per_gpu": round(dense_gpu),
                         "expert_params_per_gpu": round(exp_gpu),
                         "in_flight_micro_batches": {str(k): v for k, v in in_flight[r].items()},
                         "memory_gib": {k: round(v / GiB, 2) for k, v in mem.items()}})

    from megatron_dsv3.pipeline.simulate import Times, simulate

    sim_name = "1f1b" if lay.schedule == "1f1b" else lay.schedule
    sim = simulate(sim_name, lay.pp, micro_batches, Times(), lay.vpp or 2)
    moe_layers = sum(1 for g in range(1, config.num_layers + 1)
                     if counts["layers"][g]["experts"]) + (args.mtp or 0)
    from megatron_dsv3.dispatch.fp8_payload import Fp8Payload
    from megatron_dsv3.dispatch.topology import node_limit

    ep_nodes = max(1, lay.ep // lay.gpus_per_node)
    # a token reaches at most node_limit nodes, its own possibly among them: at most that many
    # other nodes, and never more than there are (validate() checked the groups align)
    copies = min(node_limit(ep_nodes, config.moe_router_num_groups, config.moe_router_group_topk),
                 ep_nodes - 1)
    h = config.hidden_size
    dispatch_row = Fp8Payload(h).row_bytes if args.dispatch_fp8 else 2 * h  # (FP8: + scales)
    # forward: dispatch + BF16 combine; backward: the combine's gradient dispatched and the
    # dispatch's gradient combined, both BF16
    a2a_forward = copies * (dispatch_row + 2 * h)
    a2a_token_layer = a2a_forward + copies * (2 * h + 2 * h)
    result.update({
        "parameters": {"total_main": counts["total_main"], "mtp": counts["total_mtp"],
                       "activated_main": counts["activated_main"],
                       "activated_mtp": counts["activated_mtp"],
                       "embedding": counts["embedding"], "output_head": counts["output_head"],
                       "replicated_small": small, "replicated_small_fraction": small_frac},
        "micro_batches": micro_batches,
        "tokens_per_micro_batch": tokens,
        "recompute_modules": recompute,
        "activation_bytes_per_token": {
            "dense_layer": sum(activation_bytes_per_token(config, 1, recompute, lay.tp).values()),
            "moe_layer": sum(activation_bytes_per_token(config, config.num_layers, recompute,
                                                        lay.tp).values())},
        "per_rank": per_rank,
        "max_memory_gib": max(p["memory_gib"]["total"] for p in per_rank),
        "bubble": {"times": vars(Times()), "total": sim["total"], "bubble": sim["bubble"],
                   "fraction": sim["bubble"] / sim["total"]},
        "expert_all_to_all": {
            "inter_node_copies_per_token_max": copies,
            "forward_bytes_per_token_per_moe_layer": a2a_forward,
            "bytes_per_token_per_moe_layer": a2a_token_layer,
            "inter_node_bytes_per_micro_batch_per_moe_layer": a2a_token_layer * tokens,
            "inter_node_bytes_per_micro_batch_all_layers": a2a_token_layer * tokens * moe_layers},
    })
    if args.gpu_memory_gib and result["max_memory_gib"] > args.gpu_memory_gib:
        result["fits"] = False
    else:
        result["fits"] = True
    return result


def _fmt_b(n: float) -> str:
    return f"{n / 1e9:.2f}B"


def render(result: Dict) -> str:
    L = result["layout"]
    lines = [f"layout: world {L['world_size']} = {L['nodes']} nodes x {L['gpus_per_node']} GPUs; "
             f"TP {L['tp']} PP {L['pp']} EP {L['ep']} DP {L['dp']} (expert DP {L['expert_dp']}); "
             f"EP spans {L['ep_nodes']} nodes; schedule {L['schedule']}, {L['stages']} stages "
             f"of {L['num_layers']} layers"]
    split = [f"{what} pipeline rank {L[f'decoder_{what}_pipeline_num_layers']}"
             for what in ("first", "last") if L.get(f"decoder_{what}_pipeline_num_layers")]
    if split:
        lines[0] += f" ({', '.join(split)} layers, the other ranks split the rest evenly)"
    lines.append("placement (global layer numbers per chunk):")
    for r, chunks in result["placement"].items():
        tags = [k for k, v in result["holders"].items() if str(v) == r
                and (k != "mtp" or L["mtp_num_layers"])]
        desc = "  ".join(f"chunk{c}={ls[0]}-{ls[-1]}" if ls else f"chunk{c}=-"
                         for c, ls in enumerate(chunks))
        lines.append(f"  pp_rank {int(r):>3}: {desc}" + (f"  [{', '.join(tags)}]" if tags else ""))
    if "parameters" not in result:
        return "\n".join(lines)
    P = result["parameters"]
    lines.append(f"parameters (built on meta): main {_fmt_b(P['total_main'])}, MTP "
                 f"{_fmt_b(P['mtp'])}; activated per token {_fmt_b(P['activated_main'])} "
                 f"(+{_fmt_b(P['activated_mtp'])} MTP; the embedding lookup not counted)")
    lines.append(f"micro-batches per step {result['micro_batches']}, tokens per micro-batch "
                 f"{result['tokens_per_micro_batch']}, recompute {result['recompute_modules']}")
    A = result["activation_bytes_per_token"]
    lines.append(f"activation estimate: {A['dense_layer']} B/token dense layer, {A['moe_layer']} "
                 f"B/token MoE layer")
    lines.append("per-GPU memory (GiB): rank  params  weights  fp8copy  grads  optimizer  "
                 "activations(in flight)  total")
    for p in result["per_rank"]:
        m = p["memory_gib"]
        lines.append(f"  {p['pp_rank']:>4} {_fmt_b(p['params_per_gpu']):>8} {m['weights_bf16']:>8} "
                     f"{m['weights_fp8_copy']:>8} {m['grads_fp32']:>6} {m['optimizer']:>9} "
                     f"{m['activations']:>9} ({p['in_flight_micro_batches']}) {m['total']:>7}")
    B = result["bubble"]
    lines.append(f"pipeline bubble (simulator, F={B['times']['F']} B={B['times']['B']} "
                 f"W={B['times']['W']} F&B={B['times']['FB']}): {B['bubble']:g} of {B['total']:g} "
                 f"({100 * B['fraction']:.1f}%)")
    X = result["expert_all_to_all"]
    lines.append(f"expert all-to-all: <= {X['inter_node_copies_per_token_max']} inter-node copies "
                 f"per token; a micro-batch sends (forward + backward) "
                 f"{X['inter_node_bytes_per_micro_batch_per_moe_layer'] / GiB:.3f} GiB inter-node "
                 f"per MoE layer from each GPU of the layer's stage, "
                 f"{X['inter_node_bytes_per_micro_batch_all_layers'] / GiB:.2f} GiB through all "
                 f"MoE layers (spread over the pipeline stages)")
    lines.append(f"max per-GPU memory {result['max_memory_gib']} GiB"
                 + ("" if result["fits"] else "  -- DOES NOT FIT --gpu-memory-gib"))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_dsv3.plan", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="deepseek-v3", help="deepseek-v3 | deepseek-v3-tiny")
    p.add_argument("--num-layers", type=positive_int, default=None,
                   help="override the preset's layers (>= 1)")
    p.add_argument("--first-k-dense", type=non_negative_int, default=None,
                   help="dense layers first (0..--num-layers)")
    p.add_argument("--num-experts", dest="num_moe_experts", type=positive_int, default=None,
                   help="routed experts (>= 1)")
    p.add_argument("--moe-router-topk", type=positive_int, default=None,
                   help="experts per token (>= 1)")
    p.add_argument("--moe-router-num-groups", type=positive_int, default=None,
                   help="expert groups (>= 1, dividing --num-experts)")
    p.add_argument("--moe-router-group-topk", type=positive_int, default=None,
                   help="node limit M (1..--moe-router-num-groups)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int, default=1)
    p.add_argument("--schedule", "--pipeline-schedule", dest="schedule", default="1f1b")
    p.add_argument("--decoder-first-pipeline-num-layers", type=positive_int, default=None,
                   help="decoder layers on the first pipeline rank, over all its chunks "
                   "(Megatron's flag; DualPipeV: the earlier of its two stages takes the odd one)")
    p.add_argument("--decoder-last-pipeline-num-layers", type=positive_int, default=None,
                   help="decoder layers on the last pipeline rank, over all its chunks")
    p.add_argument("--virtual-pipeline-model-parallel-size", dest="vpp", type=positive_int,
                   default=None, help="--schedule interleaved: model chunks per rank")
    p.add_argument("--mtp", "--mtp-num-layers", dest="mtp", type=non_negative_int, default=1,
                   help="MTP depth (>= 0; 0 = none)")
    p.add_argument("--fp8", action="store_true", help="count an FP8 copy of the weights")
    p.add_argument("--bf16-moments", action="store_true", help="Adam moments in BF16")
    p.add_argument("--zero1", "--use-distributed-optimizer", dest="zero1", action="store_true")
    p.add_argument("--micro-batch-size", type=positive_int, default=1, help="(>= 1)")
    p.add_argument("--seq-length", type=positive_int, default=4096, help="(>= 1)")
    p.add_argument("--global-batch-size", type=positive_int, default=None,
                   help="(>= 1, a multiple of --micro-batch-size x DP; default: no step check)")
    p.add_argument("--recompute", default="selective",
                   help="none | selective (all of layernorm,mla_up_proj,moe_act) | a comma list")
    p.add_argument("--dispatch-fp8", action="store_true", help="FP8 dispatch payload")
    p.add_argument("--gpu-memory-gib", type=positive_float, default=None,
                   help="refuse above this (> 0)")
    p.add_argument("--placement-only", action="store_true", help="layout + placement, no model")
    p.add_argument("--json", action="store_true")
    return p


# model config fields set by flags: the config's errors name the field, the user typed the flag
_CONFIG_FLAGS = {"num_layers": "--num-layers", "first_k_dense_replace": "--first-k-dense",
                 "num_moe_experts": "--num-experts", "moe_router_topk": "--moe-router-topk",
                 "moe_router_num_groups": "--moe-router-num-groups",
                 "moe_router_group_topk": "--moe-router-group-topk", "mtp_num_layers": "--mtp"}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.recompute not in ("none", "selective"):
        bad = sorted(set(args.recompute.split(",")) - set(RECOMPUTE_MODULES))
        if bad:
            print(f"error: --recompute {bad} invalid: allowed values are none, selective or a "
                  f"comma list of {', '.join(RECOMPUTE_MODULES)}", file=sys.stderr)
            return 2
    from megatron_dsv3.configs import PRESETS

    if args.preset not in PRESETS:
        print(f"error: --preset {args.preset!r} is invalid: allowed values are "
              f"{', '.join(sorted(PRESETS))}", file=sys.stderr)
        return 2
    try:
        result = plan(args)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the model config refused a value one of our flags set
        flags = [flag for field, flag in _CONFIG_FLAGS.items()
                 if re.match(rf"{field}(?!\w)", str(e))]
        if not flags:
            raise
        print(f"error: {flags[0]}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else render(result))
    if not result.get("fits", True):
        print(f"error: the layout does not fit: max per-GPU memory {result['max_memory_gib']} "
              f"GiB > --gpu-memory-gib {args.gpu_memory_gib}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
