"""The training job of the examples: DeepSeek-V3 on Megatron's data path.

One process on CPU, or several under torchrun (gloo on CPU, NCCL on GPU). Each step consumes one
global batch of `micro_batch_size x micro_batches x data-parallel size` sequences; data-parallel
rank d takes micro-batches [d*M, (d+1)*M) of it, so any layout trains on the same samples as the
single process with `micro_batches * dp` micro-batches. A step: forward/backward of each
micro-batch (LM loss + MTP loss + sequence-wise aux loss), gradient averaging, clipping, AdamW
(optionally ZeRO-1 sharded, optionally BF16 moments), then the aux-loss-free bias update from the
step's global expert loads. Rank 0 logs LM loss, MTP loss, aux loss, tokens/s and expert-load
max/mean per MoE layer, and writes metrics.jsonl, a loss plot, an expert-load heatmap and
checkpoints (`save_interval`; `resume` continues from one with the same losses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

from megatron_dsv3.moe.balancing import routers_of, update_expert_biases


@dataclasses.dataclass
class TrainArgs:
    preset: str = "deepseek-v3-tiny"
    steps: int = 300
    seq_length: int = 128
    micro_batch_size: int = 16
    micro_batches: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    save_dir: Optional[str] = "runs/tiny"
    save_interval: int = 0
    resume: Optional[str] = None
    exit_interval: int = 0  # like Megatron's --exit-interval: save and stop at a multiple of it
    cache_dir: str = "runs/cache"
    corpus_bytes: int = 8 << 20
    recompute: bool = False
    zero1: bool = False
    fp8: bool = False  # DeepSeek's fine-grained FP8 recipe in every linear layer (emulated on CPU)
    fp8_pow2_scales: bool = False
    bf16: bool = False  # BF16 parameters and activations (FP32 master weights in the optimizer)
    bf16_moments: bool = False  # AdamW moments stored in BF16
    pp: int = 1  # pipeline ranks; > 1 trains under DualPipeV (rank r holds stages r and 2P-1-r)
    ep: int = 1  # expert-parallel ranks (node-aware two-stage dispatcher)
    ranks_per_node: int = 0  # simulate nodes of this many ranks (MEGATRON_DSV3_RANKS_PER_NODE)
    dispatch_fp8: bool = False  # E4M3 dispatch payload with power-of-2 1x128 scales
    dispatch_chunks: int = 2  # chunks of the dispatch/expert/combine pipeline
    # DualPipeV F&B pairs in two threads: one's all-to-alls in flight while the other computes
    overlap_pairs: bool = False
    trace_step: int = 0  # pp > 1: this step's F/B and all-to-all timeline (json, png) to save_dir
    config_overrides: Dict = dataclasses.field(default_factory=dict)


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1):
    """torch.distributed from torchrun's environment (a one-rank gloo world without it) and
    Megatron's parallel_state with the given sizes, if not set up yet."""
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=int(os.environ.get("RANK", "0")), world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)


def init_single_process() -> None:
    """A one-rank gloo world on a free local port and Megatron's parallel_state with all sizes 1
    (what building our modules needs outside a launcher), if not set up yet."""
    import socket

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def moe_layers(models):
    """(global layer number, DeepSeekMoE) of every MoE layer, MTP layers included."""
    from megatron_dsv3.moe.layer import DeepSeekMoE

    return [(m.layer_number, m) for model in models for m in model.modules()
            if isinstance(m, DeepSeekMoE)]


def expert_loads(models, group) -> List[Dict]:
    """Each MoE layer's token counts per expert since the last bias update, summed over the
    data-parallel group (the global batch), with max/mean (1.0 = perfectly balanced)."""
    stats = []
    for layer_number, moe in moe_layers(models):
        load = moe.router.local_tokens_per_expert.clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)
        mean = load.mean().item()
        stats.append({"layer": layer_number, "load": load.tolist(),
                      "max_over_mean": (load.max().item() / mean) if mean > 0 else 0.0})
    return stats


class Trainer:
    def __init__(self, args: TrainArgs, log=print):
        from megatron_dsv3.configs import get_config
        from megatron_dsv3.model import build_model
        from megatron_dsv3.training.data import build_indexed_corpus, build_train_dataset
        from megatron_dsv3.training.zero import ZeroOneOptimizer

        self.args = args
        if args.ranks_per_node:
            os.environ["MEGATRON_DSV3_RANKS_PER_NODE"] = str(args.ranks_per_node)
        init_distributed(pp=args.pp, ep=args.ep)
        self.rank = dist.get_rank()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_rank = dist.get_rank(self.pp_group)
        for flag in ("overlap_pairs", "trace_step"):
            if getattr(args, flag) and args.pp < 2:
                raise ValueError(f"{flag}={getattr(args, flag)} applies to DualPipeV runs: allowed "
                                 f"with pp >= 2 only (pp={args.pp})")
        if args.pp > 1 and args.micro_batches < 2 * args.pp:
            raise ValueError(f"micro_batches={args.micro_batches} is too few for DualPipeV over "
                             f"pp={args.pp} ranks: allowed values are >= {2 * args.pp}")
        if args.ep > 1:
            from megatron_dsv3.dispatch import initialize_dispatch_groups

            initialize_dispatch_groups()
        self.log = log if self.rank == 0 else (lambda *_: None)
        self.dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.dp = dist.get_world_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group)
        torch.manual_seed(args.seed)
        overrides = dict(args.config_overrides)
        overrides.setdefault("init_seed", args.seed)
        if args.recompute:
            overrides.update(recompute_granularity="selective",
                             recompute_modules=["layernorm", "mla_up_proj", "moe_act"])
        if args.fp8:
            overrides["dsv3_fp8_recipe"] = "deepseek-pow2" if args.fp8_pow2_scales else "deepseek"
        if args.bf16:
            overrides.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
        overrides.update(pipeline_model_parallel_size=args.pp, expert_model_parallel_size=args.ep,
                         dsv3_dispatch_fp8=args.dispatch_fp8,
                         dsv3_dispatch_chunks=args.dispatch_chunks)
        self.config = get_config(args.preset, **overrides)
        if args.pp > 1:
            from megatron_dsv3.pipeline import build_chunks

            self.models = build_chunks(self.config, "dualpipev", self.pp_rank, args.pp)
        else:
            self.models = [build_model(self.config)]
        params, seen = [], set()
        for p in (p for m in self.models for p in m.parameters()):
            if id(p) not in seen:  # rank 0's two DualPipeV chunks share the embedding
                seen.add(id(p))
                params.append(p)
        from megatron_dsv3.optim import AdamW

        inner = (functools.partial(AdamW, moment_dtype=torch.bfloat16) if args.bf16_moments
                 else torch.optim.AdamW)
        self.optimizer = ZeroOneOptimizer(
            params, inner, dp_group=self.dp_group,
            expert_dp_group=parallel_state.get_expert_data_parallel_group(), shard=args.zero1,
            weight_decay=args.weight_decay, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        if self.rank == 0:
            prefix = build_indexed_corpus(args.cache_dir, args.corpus_bytes, log=self.log)
        dist.barrier()
        prefix = build_indexed_corpus(args.cache_dir, args.corpus_bytes, log=lambda *_: None)
        samples = args.steps * args.micro_batches * self.dp * args.micro_batch_size
        self.dataset = build_train_dataset(prefix, args.seq_length, samples, args.seed,
                                           args.cache_dir)
        self.step = 0
        self.history: List[Dict] = []
        if args.resume:
            self.load(args.resume)
        n_params = sum(p.numel() for p in params)
        self.log(f"model: {args.preset}, {n_params / 1e6:.2f}M parameters on rank 0, "
                 f"{self.config.num_layers} layers (+{self.config.mtp_num_layers or 0} MTP), "
                 f"{self.config.num_moe_experts} experts top-{self.config.moe_router_topk}; "
                 f"world {dist.get_world_size()}, data-parallel {self.dp}, "
                 f"pipeline {args.pp}{' (DualPipeV)' if args.pp > 1 else ''}, "
                 f"expert-parallel {args.ep}"
                 f"{', ZeRO-1' if args.zero1 else ''}{', FP8' if args.fp8 else ''}"
                 f"{', BF16' if args.bf16 else ''}{', BF16 moments' if args.bf16_moments else ''}")

    # -- data --------------------------------------------------------------------------------
    def micro_batch(self, step: int, j: int) -> Dict[str, torch.Tensor]:
        """Micro-batch j of this data-parallel rank in global step `step`."""
        a = self.args
        index = (step * self.dp + self.dp_rank) * a.micro_batches + j
        rows = [self.dataset[index * a.micro_batch_size + k] for k in range(a.micro_batch_size)]
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    # -- one step ----------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        """Megatron-style forward step: (output, loss_func) for one micro-batch."""
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"].float()

        def loss_func(per_token):
            total = (per_token.float() * mask).sum()
            return total, mask.sum().to(torch.int), {"lm loss": (total / mask.sum()).detach()}

        return out, loss_func

    def forward_backward_pipelined(self) -> Dict[str, float]:
        """DualPipeV over the pipeline group; the loss lives on pipeline rank 0 (V's last stage)
        and is broadcast to the other stages for logging."""
        from megatron_dsv3.pipeline import forward_backward_dualpipev
        from megatron_dsv3.pipeline.executor import LAST_STEP_STATS

        from megatron_dsv3.pipeline import set_overlapped_forward_backward
        from megatron_dsv3.pipeline.overlap import StepTrace, threaded_forward_backward

        a = self.args
        batches = [self.micro_batch(self.step, j) for j in range(a.micro_batches)]
        set_overlapped_forward_backward(threaded_forward_backward if a.overlap_pairs else None)
        trace = StepTrace()
        tracing = a.trace_step == self.step + 1 and a.save_dir
        with trace.recording() if tracing else contextlib.nullcontext():
            records = forward_backward_dualpipev(
                forward_step_func=self._forward_step, data_iterator=[iter(batches), iter(batches)],
                model=self.models, num_microbatches=a.micro_batches, seq_length=a.seq_length,
                micro_batch_size=a.micro_batch_size)
        if tracing:
            self._write_trace(trace)
        lm = torch.tensor([sum(float(r["lm loss"]) for r in records) / a.micro_batches
                           if records else 0.0])
        dist.broadcast(lm, src=dist.get_process_group_ranks(self.pp_group)[0], group=self.pp_group)
        aux = sum(float(r.last_aux_loss) for r in routers_of(self.models)
                  if r.last_aux_loss is not None) / a.micro_batches
        return {"lm_loss": lm.item(), "aux_loss": aux,
                "tokens": a.micro_batches * a.micro_batch_size * a.seq_length,
                "bubble_fraction": LAST_STEP_STATS.get("bubble_fraction", 0.0)}

    def _write_trace(self, trace) -> None:
        from megatron_dsv3.pipeline.overlap import plot_overlap_timeline

        os.makedirs(self.args.save_dir, exist_ok=True)
        data = trace.to_json()
        with open(os.path.join(self.args.save_dir, f"timeline_rank{self.rank}.json"), "w") as f:
            json.dump(data, f)
        if self.rank == 0:
            mode = "overlapped (two threads)" if self.args.overlap_pairs else "sequential"
            plot_overlap_timeline(data, os.path.join(self.args.save_dir, "timeline.png"),
                                  f"rank 0, step {self.step + 1}: F&B pairs {mode}; lane-0 "
                                  f"transfers in flight during lane-1 work and vice versa: "
                                  f"{data['overlap_seconds']:.3f} s")
            self.log(f"wrote the step-{self.step + 1} timeline to {self.args.save_dir}/timeline.png")

    def forward_backward(self) -> Dict[str, float]:
        """All micro-batches of this rank: mean LM loss and aux loss, tokens processed."""
        if self.args.pp > 1:
            return self.forward_backward_pipelined()
        a, model = self.args, self.models[0]
        scale = torch.tensor(1.0 / a.micro_batches)
        MoEAuxLossAutoScaler.set_loss_scale(scale)
        MTPLossAutoScaler.set_loss_scale(scale)
        lm_loss, aux, tokens = 0.0, 0.0, 0
        for j in range(a.micro_batches):
            batch = self.micro_batch(self.step, j)
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"].float()
            loss = (per_token * mask).sum() / mask.sum()
            (loss / a.micro_batches).backward()
            lm_loss += loss.item() / a.micro_batches
            tokens += batch["tokens"].numel()
            aux += sum(float(r.last_aux_loss) for r in routers_of(self.models)
                       if r.last_aux_loss is not None) / a.micro_batches
        return {"lm_loss": lm_loss, "aux_loss": aux, "tokens": tokens}

    def train_step(self) -> Dict:
        a = self.args
        for m in self.models:
            m.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, a)
        start = time.perf_counter()
        out = self.forward_backward()
        self.optimizer.reduce_gradients()
        norm_sq = self.optimizer.grad_norm_sq()
        if dist.get_world_size() > 1:
            dist.all_reduce(norm_sq)
        grad_norm = norm_sq.sqrt().item()
        if a.clip_grad and grad_norm > a.clip_grad:
            self.optimizer.scale_gradients(a.clip_grad / (grad_norm + 1e-6))
        self.optimizer.step()
        self.optimizer.zero_grad()
        loads = expert_loads(self.models, self.dp_group)
        update_expert_biases(self.models, self.config.moe_router_bias_update_rate, self.dp_group)
        elapsed = time.perf_counter() - start
        metrics = torch.tensor([out["lm_loss"], out["aux_loss"]])
        if self.dp > 1:
            dist.all_reduce(metrics, group=self.dp_group)
            metrics /= self.dp
        mtp = self.mtp_losses()
        if mtp is not None and self.dp > 1:
            dist.all_reduce(mtp, group=self.dp_group)
            mtp /= self.dp
        traffic = self.dispatch_traffic()
        record = {"step": self.step + 1, "lm_loss": metrics[0].item(),
                  "mtp_loss": mtp.tolist() if mtp is not None else None,
                  "aux_loss": metrics[1].item(), "grad_norm": grad_norm, "lr": lr_at(self.step, a),
                  "tokens_per_s": out["tokens"] * self.dp / elapsed,
                  "expert_load_max_over_mean": [l["max_over_mean"] for l in loads],
                  "expert_load": [l["load"] for l in loads],
                  "moe_layers": [l["layer"] for l in loads],
                  "bubble_fraction": out.get("bubble_fraction"),
                  "inter_node_bytes_per_token": traffic}
        self.step += 1
        return record

    def mtp_losses(self) -> Optional[torch.Tensor]:
        """Mean MTP loss per depth of this step, on every pipeline rank (MTP lives on the last
        stage: pipeline rank 0 under DualPipeV)."""
        depth = self.config.mtp_num_layers or 0
        if not depth:
            return None
        value = None
        for m in self.models:
            if getattr(m, "mtp_process", False):
                value = m.pop_mtp_losses()
        if self.args.pp > 1:
            value = value if value is not None else torch.zeros(depth)
            dist.broadcast(value, src=dist.get_process_group_ranks(self.pp_group)[0],
                           group=self.pp_group)
        return value

    def dispatch_traffic(self) -> Optional[float]:
        """Inter-node bytes per token of this step's expert dispatch, over all ranks."""
        from megatron_dsv3.dispatch import NodeAwareDispatcher

        dispatchers = [m.dispatcher for _, m in moe_layers(self.models)
                       if isinstance(m.dispatcher, NodeAwareDispatcher)]
        if not dispatchers:
            return None
        sent = torch.tensor([float(sum(d.counters.inter_node_bytes for d in dispatchers))])
        for d in dispatchers:
            d.counters.reset()
        dist.all_reduce(sent)  # every rank's MoE layers (all stages, all data-parallel ranks)
        a = self.args
        tokens = a.micro_batches * a.micro_batch_size * a.seq_length * self.dp  # the global batch
        return sent.item() / tokens

    def train(self) -> List[Dict]:
        a = self.args
        writer = self.rank == 0 and a.save_dir
        if writer:
            os.makedirs(a.save_dir, exist_ok=True)
        metrics = open(os.path.join(a.save_dir, "metrics.jsonl"), "a" if a.resume else "w") \
            if writer else None
        window: List[Dict] = []
        while self.step < a.steps:
            record = self.train_step()
            self.history.append(record)
            window.append(record)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if self.step % a.log_interval == 0 or self.step == a.steps:
                self.log(format_record(window))
                window = []
            if a.save_dir and a.save_interval and self.step % a.save_interval == 0:
                self.save(os.path.join(a.save_dir, f"checkpoint_{self.step:06d}"))
            if a.exit_interval and self.step % a.exit_interval == 0:
                break
            _maybe_inject_fault(self.rank, self.step)
        if metrics:
            metrics.close()
        if a.save_dir:
            self.save(os.path.join(a.save_dir, "checkpoint"))
        if writer:
            from megatron_dsv3.training.plots import plot_expert_load, plot_loss

            plot_loss(self.history, os.path.join(a.save_dir, "loss.png"))
            plot_expert_load(self.history, os.path.join(a.save_dir, "expert_load.png"),
                             num_layers=self.config.num_layers)
        return self.history

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, path: str):
        """Per-rank files <path>/rank<r>.pt (model chunks with router biases, optimizer shard,
        step, RNG), written to a temporary directory that replaces `path` only when every rank
        has finished: an interrupted save never replaces the last good checkpoint."""
        tmp = path + ".tmp"
        if self.rank == 0:
            os.makedirs(tmp, exist_ok=True)
        dist.barrier()
        torch.save({"models": [m.state_dict() for m in self.models],
                    "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "rng": torch.get_rng_state(), "args": dataclasses.asdict(self.args),
                    "world_size": dist.get_world_size()},
                   os.path.join(tmp, f"rank{self.rank}.pt"))
        dist.barrier()
        if self.rank == 0:
            old = path + ".old"
            if os.path.exists(path):
                os.replace(path, old)
            os.replace(tmp, path)
            if os.path.exists(old):
                import shutil

                shutil.rmtree(old)
        dist.barrier()
        self.log(f"saved checkpoint {path} (step {self.step})")

    def load(self, path: str):
        state = torch.load(os.path.join(path, f"rank{self.rank}.pt"), weights_only=False)
        if state["world_size"] != dist.get_world_size():
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} ranks; this "
                             f"run has {dist.get_world_size()} (resume with the same layout)")
        for m, sd in zip(self.models, state["models"]):
            m.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        self.log(f"resumed from {path} at step {self.step}")


def _maybe_inject_fault(rank: int, step: int) -> None:
    """Fault injection for recovery tests: MEGATRON_DSV3_KILL_RANK_AT="rank:step" makes that rank
    die abruptly after that step, as a crashed node would."""
    spec = os.environ.get("MEGATRON_DSV3_KILL_RANK_AT")
    if spec and spec == f"{rank}:{step}":
        print(f"[fault injection] rank {rank} dies after step {step}", flush=True)
        os._exit(17)


def format_record(window: List[Dict]) -> str:
    last = window[-1]
    n = len(window)
    lm = sum(r["lm_loss"] for r in window) / n
    tps = sum(r["tokens_per_s"] for r in window) / n
    aux = sum(r["aux_loss"] for r in window) / n
    parts = [f"step {last['step']:5d}", f"loss {lm:.4f}"]
    if last["mtp_loss"] is not None:
        mtp = [sum(r["mtp_loss"][d] for r in window) / n for d in range(len(last["mtp_loss"]))]
        parts.append("mtp " + "/".join(f"{m:.4f}" for m in mtp))
    parts += [f"aux {aux:.2e}", f"lr {last['lr']:.2e}", f"{tps:,.0f} tok/s"]
    if last.get("bubble_fraction") is not None:
        parts.append(f"bubble {sum(r['bubble_fraction'] for r in window) / n:.1%}")
    if last.get("inter_node_bytes_per_token") is not None:
        parts.append(f"inter-node {last['inter_node_bytes_per_token']:,.0f} B/token")
    parts += [
              "load max/mean " + " ".join(f"{v:.2f}" for v in last["expert_load_max_over_mean"])]
    return " | ".join(parts)
