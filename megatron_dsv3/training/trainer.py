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
import shutil
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

from megatron_dsv3.fp8 import backends
from megatron_dsv3.moe.balancing import last_balance_loss, update_expert_biases
from megatron_dsv3.world import init_distributed


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
    # "auto" (the CLI's bare --resume): save_dir's latest checkpoint; or a checkpoint directory,
    # a checkpoint root or a run directory. Writing into a run directory that already holds a run
    # needs resume or overwrite.
    resume: Optional[str] = None
    overwrite: bool = False  # start over in a used save_dir (old checkpoints kept until replaced)
    keep_checkpoints: int = 2  # published checkpoints kept in save_dir/checkpoints
    skip_nonfinite_steps: bool = False  # skip (and count) steps with a non-finite loss or gradient
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
    # liveness (megatron_dsv3.liveness): a rank that makes no progress for this many seconds ends
    # the job with a message naming it (0 = off); checkpoint saves and the first step get
    # watchdog_save_timeout (0 = 3 x watchdog_timeout); collectives time out after
    # collective_timeout_minutes (0 = torch's default, 30 min for gloo)
    watchdog_timeout: float = 300.0
    watchdog_save_timeout: float = 0.0
    collective_timeout_minutes: float = 20.0  # above the watchdog's 900 s save allowance
    config_overrides: Dict = dataclasses.field(default_factory=dict)
    # resume with other RESUME_ARGS values than the checkpoint's (refused otherwise)
    override_saved_args: bool = False


# Arguments a resume keeps (a change is refused by name unless --override-saved-args): the data
# stream (its position is the step times the batch shape) and the optimizer and its schedule.
RESUME_ARGS = ("seq_length", "micro_batch_size", "micro_batches", "seed", "corpus_bytes", "lr",
               "min_lr", "warmup_steps", "weight_decay", "clip_grad", "bf16", "bf16_moments",
               "fp8", "fp8_pow2_scales")


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


def expert_loads(models, group, pp_group=None) -> List[Dict]:
    """Each MoE layer's token counts per expert since the last bias update, summed over the
    data-parallel group (the global batch), with max/mean (1.0 = perfectly balanced); with
    `pp_group`, every stage's layers (on every pipeline rank), by layer number."""
    stats = []
    for layer_number, moe in moe_layers(models):
        load = moe.router.local_tokens_per_expert.clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(load, group=group)
        mean = load.mean().item()
        stats.append({"layer": layer_number, "load": load.tolist(),
                      "max_over_mean": (load.max().item() / mean) if mean > 0 else 0.0})
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        parts = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, stats, group=pp_group)
        stats = sorted((s for part in parts for s in part), key=lambda s: s["layer"])
    return stats


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient (names the step)."""


def metrics_records(path: str):
    """(line, record) of each step metrics.jsonl logged, up to its first unreadable line (a torn
    last line)."""
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                return
            if not isinstance(record, dict) or "step" not in record:
                return
            yield line, record


class Trainer:
    def __init__(self, args: TrainArgs, log=print):
        from megatron_dsv3.training.validation import (check_world_timeout, validate_launch,
                                                       validate_train_args)

        validate_train_args(args)
        validate_launch(args)
        self.args = args
        if args.ranks_per_node:
            os.environ["MEGATRON_DSV3_RANKS_PER_NODE"] = str(args.ranks_per_node)
        timeout = args.collective_timeout_minutes
        init_distributed(timeout_minutes=timeout, megatron=False)  # the world only
        self.rank = dist.get_rank()
        self.log = log if self.rank == 0 else (lambda *_: None)
        from megatron_dsv3.liveness import make_watchdog

        check_world_timeout(args)
        # Start-up is watched by a watchdog of its own, from the moment the world exists: a rank
        # stalled while the groups are made, in recovery, the barriers, building the corpus or a
        # resume's load ends the job naming it, instead of leaving the others in a collective
        # until its timeout ("startup" and "load" have the slow allowance, and each start-up
        # stage that ends restarts it). It ends with start-up; train() watches with another,
        # whose first step gets the same allowance (so nothing is left running by a Trainer that
        # is built but not trained).
        startup = make_watchdog(args.watchdog_timeout, args.watchdog_save_timeout).start()
        try:
            # (a rank stalled in start-up, for tests: before the groups, whose creation waits
            # for every rank)
            _maybe_inject_fault(self.rank, "start")
            init_distributed(pp=args.pp, ep=args.ep, timeout_minutes=timeout)  # Megatron's groups
            self.pp_group = parallel_state.get_pipeline_model_parallel_group()
            self.pp_rank = dist.get_rank(self.pp_group)
            if args.ep > 1:
                from megatron_dsv3.dispatch import initialize_dispatch_groups

                initialize_dispatch_groups()
            startup.progress(0, "startup")
            self._start_up(args, startup)
        finally:
            startup.close()
        self.watchdog = make_watchdog(args.watchdog_timeout, args.watchdog_save_timeout)

    def _start_up(self, args: TrainArgs, startup) -> None:
        """Run directory, model, optimizer, data and resume (under the `startup` watchdog: each
        stage that ends reports progress, the resume's load runs in its "load" phase)."""
        from megatron_dsv3.configs import get_config
        from megatron_dsv3.model import build_model
        from megatron_dsv3.training.data import build_indexed_corpus, build_train_dataset
        from megatron_dsv3.training.zero import ZeroOneOptimizer

        self._resumed_from: Optional[str] = None  # the checkpoint directory load() read
        self._reset_checkpoints = bool(args.overwrite)  # the first save forgets the old run's
        self.skipped_steps = 0
        self._prepare_run_dir()
        startup.progress(0, "startup")
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
            from megatron_dsv3.model_chunks import build_model_chunks

            self.models = build_model_chunks(self.config, "dualpipev", self.pp_rank, args.pp)
        else:
            self.models = [build_model(self.config)]
        params, seen = [], set()
        for p in (p for m in self.models for p in m.parameters()):
            if id(p) not in seen:  # rank 0's two DualPipeV chunks share the embedding
                seen.add(id(p))
                params.append(p)
        from megatron_dsv3.optim import AdamW, torch_adamw

        if args.bf16_moments:
            inner, kind = functools.partial(AdamW, moment_dtype=torch.bfloat16), "BF16 moments"
        else:
            inner, kind = torch_adamw(params)  # (masters are FP32 on the params' device)
        self.optimizer = ZeroOneOptimizer(
            params, inner, dp_group=self.dp_group,
            expert_dp_group=parallel_state.get_expert_data_parallel_group(), shard=args.zero1,
            weight_decay=args.weight_decay, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        startup.progress(0, "startup")
        if self.rank == 0:
            prefix = build_indexed_corpus(args.cache_dir, args.corpus_bytes, log=self.log)
        dist.barrier()
        prefix = build_indexed_corpus(args.cache_dir, args.corpus_bytes, log=lambda *_: None)
        samples = args.steps * args.micro_batches * self.dp * args.micro_batch_size
        self.dataset = build_train_dataset(prefix, args.seq_length, samples, args.seed,
                                           args.cache_dir, log=self.log)
        startup.progress(0, "startup")
        self.step = 0
        self._step_aux = 0.0  # balancing losses of the step's forwards (pipelined steps)
        self.history: List[Dict] = []
        if args.resume:
            with startup.phase("load"):
                self.load(args.resume)
            if self.step > args.steps:
                raise ValueError(f"--steps {args.steps} is below the resumed checkpoint's step "
                                 f"{self.step} ({args.resume}): allowed are --steps >= "
                                 f"{self.step} (the run's total length, not steps to add)")
        n_params = sum(p.numel() for p in params)
        self.log(f"model: {args.preset}, {n_params / 1e6:.2f}M parameters on rank 0, "
                 f"{self.config.num_layers} layers (+{self.config.mtp_num_layers or 0} MTP), "
                 f"{self.config.num_moe_experts} experts top-{self.config.moe_router_topk}; "
                 f"world {dist.get_world_size()}, data-parallel {self.dp}, "
                 f"pipeline {args.pp}{' (DualPipeV)' if args.pp > 1 else ''}, "
                 f"expert-parallel {args.ep}"
                 f"{', ZeRO-1' if args.zero1 else ''}{', FP8' if args.fp8 else ''}"
                 f"{', BF16' if args.bf16 else ''}; AdamW ({kind}); "
                 f"{backends.resolve(self.config).message()}")

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
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                    loss_mask=batch["loss_mask"])  # (the MTP loss masks as the LM loss does)
        # this chunk's balancing losses of this micro-batch (for the step's logged aux loss)
        self._step_aux += last_balance_loss([model])
        mask = batch["loss_mask"].float()

        def loss_func(per_token):
            total = (per_token.float() * mask).sum()
            return total, mask.sum().to(torch.int), {"lm loss": (total / mask.sum()).detach()}

        return out, loss_func

    def forward_backward_pipelined(self) -> Dict[str, float]:
        """DualPipeV over the pipeline group; the loss lives on pipeline rank 0 (V's last stage)
        and is broadcast to the other stages for logging."""
        from megatron_dsv3.lanes import StepTrace
        from megatron_dsv3.pipeline import forward_backward_dualpipev
        from megatron_dsv3.pipeline.overlap import threaded_forward_backward

        a = self.args
        batches = [self.micro_batch(self.step, j) for j in range(a.micro_batches)]
        tracing = a.trace_step == self.step + 1 and a.save_dir
        trace = StepTrace() if tracing else None
        stats: Dict[str, float] = {}
        self._step_aux = 0.0
        records = forward_backward_dualpipev(
            forward_step_func=self._forward_step, data_iterator=[iter(batches), iter(batches)],
            model=self.models, num_microbatches=a.micro_batches, seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            overlap=threaded_forward_backward if a.overlap_pairs else None, trace=trace,
            stats=stats)
        if tracing:
            self._write_trace(trace)
        lm = torch.tensor([sum(float(r["lm loss"]) for r in records) / a.micro_batches
                           if records else 0.0])
        dist.broadcast(lm, src=dist.get_process_group_ranks(self.pp_group)[0], group=self.pp_group)
        # every micro-batch's balancing losses of this rank's layers, summed over the stages
        aux = torch.tensor([self._step_aux / a.micro_batches])
        dist.all_reduce(aux, group=self.pp_group)
        return {"lm_loss": lm.item(), "aux_loss": aux.item(),
                "tokens": a.micro_batches * a.micro_batch_size * a.seq_length,
                "bubble_fraction": stats.get("bubble_fraction", 0.0)}

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
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                              loss_mask=batch["loss_mask"])
            mask = batch["loss_mask"].float()
            loss = (per_token * mask).sum() / mask.sum()
            (loss / a.micro_batches).backward()
            lm_loss += loss.item() / a.micro_batches
            tokens += batch["tokens"].numel()
            aux += last_balance_loss(self.models) / a.micro_batches
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
        # squared gradient norm and "this rank's loss is not finite", summed over every rank, so
        # all ranks take the same decision below
        stats = torch.stack([self.optimizer.grad_norm_sq(),
                             torch.tensor(0.0 if math.isfinite(out["lm_loss"])
                                          and math.isfinite(out["aux_loss"]) else 1.0)])
        if dist.get_world_size() > 1:
            dist.all_reduce(stats)
        grad_norm = stats[0].sqrt().item()
        finite = math.isfinite(grad_norm) and stats[1].item() == 0
        if not finite and not a.skip_nonfinite_steps:
            raise NonFiniteError(
                f"step {self.step + 1}: non-finite {'loss' if stats[1].item() else 'gradients'} "
                f"(grad norm {grad_norm}, loss {out['lm_loss']} on rank {self.rank}); training "
                "stopped before the optimizer step, so the last checkpoint is sound. Lower --lr, "
                "check the data, or pass --skip-nonfinite-steps to skip such steps")
        if finite:
            if a.clip_grad and grad_norm > a.clip_grad:
                self.optimizer.scale_gradients(a.clip_grad / (grad_norm + 1e-6))
            self.optimizer.step()
        else:  # skipped: no parameter and no router bias changes
            self.skipped_steps += 1
            self.log(f"step {self.step + 1}: non-finite loss or gradients, step skipped "
                     f"({self.skipped_steps} skipped so far)")
        self.optimizer.zero_grad()
        loads = expert_loads(self.models, self.dp_group, self.pp_group if a.pp > 1 else None)
        update_expert_biases(self.models,
                             self.config.moe_router_bias_update_rate if finite else 0.0,
                             self.dp_group)
        for _, moe in moe_layers(self.models):  # (routers without a bias: counts of this step)
            moe.router.local_tokens_per_expert.zero_()
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
                  "inter_node_bytes_per_token": traffic,
                  "skipped": not finite, "skipped_steps": self.skipped_steps}
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
        """Inter-node bytes per token of this step's expert dispatch, over all ranks (None when no
        rank dispatches with the node-aware dispatcher). Collective on every rank, also on one
        whose stages hold no MoE layer (e.g. DualPipeV's rank 0 with dense first layers, whose
        only MoE layer may be the MTP layer)."""
        from megatron_dsv3.dispatch import NodeAwareDispatcher

        dispatchers = [m.dispatcher for _, m in moe_layers(self.models)
                       if isinstance(m.dispatcher, NodeAwareDispatcher)]
        sent = torch.tensor([float(sum(d.counters.inter_node_bytes for d in dispatchers)),
                             float(len(dispatchers))])
        for d in dispatchers:
            d.counters.reset()
        dist.all_reduce(sent)  # every rank's MoE layers (all stages, all data-parallel ranks)
        if sent[1].item() == 0:
            return None
        a = self.args
        tokens = a.micro_batches * a.micro_batch_size * a.seq_length * self.dp  # the global batch
        return sent[0].item() / tokens

    def train(self) -> List[Dict]:
        a = self.args
        writer = self.rank == 0 and a.save_dir
        if writer:
            os.makedirs(a.save_dir, exist_ok=True)
        metrics = self._open_metrics() if writer else None
        self.watchdog.start(self.step)  # a rank without progress for the timeout ends the job
        try:
            self._loop(metrics)
        finally:
            if metrics:
                metrics.close()
            self.watchdog.close()  # (also when the loop raised: no watchdog outlives training)
        # the whole run's records (a resumed run's history holds only its own steps)
        records = [r for _, r in metrics_records(self.metrics_path)] if writer else []
        if records:
            from megatron_dsv3.training.plots import plot_expert_load, plot_loss

            plot_loss(records, os.path.join(a.save_dir, "loss.png"))
            plot_expert_load(records, os.path.join(a.save_dir, "expert_load.png"),
                             num_layers=self.config.num_layers)
        return self.history

    def _loop(self, metrics) -> None:
        """Steps until args.steps (or exit_interval), logging, periodic and final saves."""
        a = self.args
        window: List[Dict] = []
        saved_at = self.step  # (a resume already at --steps trains nothing and saves nothing)
        if self.step >= a.steps:
            self.log(f"step {self.step} is already --steps {a.steps}: nothing to train")
        while self.step < a.steps:
            record = self.train_step()
            self.watchdog.progress(self.step)
            self.history.append(record)
            window.append(record)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if self.step % a.log_interval == 0 or self.step == a.steps:
                self.log(format_record(window))
                window = []
            if a.save_dir and a.save_interval and self.step % a.save_interval == 0:
                with self.watchdog.phase("save"):
                    self.save()
                saved_at = self.step
            if a.exit_interval and self.step % a.exit_interval == 0:
                break
            _maybe_inject_fault(self.rank, self.step)
        if a.save_dir and saved_at != self.step:
            with self.watchdog.phase("save"):
                self.save()

    def _open_metrics(self):
        """metrics.jsonl for appending: on resume, first the records up to the resumed step, from
        the copy the checkpoint holds (else from metrics.jsonl itself: a crashed run may have
        logged steps its last checkpoint does not hold, and a run started with --overwrite that
        never published a checkpoint has replaced it)."""
        path = self.metrics_path
        source = path
        if self._resumed_from and os.path.isfile(os.path.join(self._resumed_from, METRICS_FILE)):
            source = os.path.join(self._resumed_from, METRICS_FILE)
        if self.args.resume and os.path.isfile(source):
            from megatron_dsv3.checkpoint.commit import write_file_atomic

            kept = [line if line.endswith("\n") else line + "\n"
                    for line, record in metrics_records(source) if record["step"] <= self.step]
            write_file_atomic(path, "".join(kept).encode(), "metrics")
            return open(path, "a")
        return open(path, "w")

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def store(self):
        from megatron_dsv3.checkpoint.commit import CheckpointStore

        return CheckpointStore(os.path.join(self.args.save_dir, "checkpoints"),
                               keep=self.args.keep_checkpoints)

    def _prepare_run_dir(self) -> None:
        """Refuse to write over an existing run without --resume or --overwrite; resolve a bare
        --resume to save_dir's latest checkpoint; clear what interrupted saves left behind."""
        a = self.args  # (--resume with --overwrite: refused by validate_train_args)
        untracked = self.store.untracked_complete() if a.save_dir else []
        if a.resume == "auto":
            latest = self.store.latest() if a.save_dir else None
            if latest is None and untracked:
                # complete (manifested) but never published: the first save was cut between its
                # rename and its tracker, or the checkpoint was copied in
                latest = os.path.join(self.store.root, untracked[-1])
                self.log(f"--resume: no tracker in {self.store.root}; resuming from the newest "
                         f"complete checkpoint there, {untracked[-1]}")
            if latest is None:
                raise ValueError(f"--resume: save_dir {a.save_dir!r} holds no published "
                                 "checkpoint (checkpoints/latest.json) and no complete step "
                                 "directory; pass a checkpoint path, or leave out --resume to "
                                 "start fresh")
            a.resume = latest
        if not a.save_dir:
            return
        metrics = self.metrics_path
        used = [what for what, present in (
            (f"checkpoint step {self.store.latest_step()}", self.store.latest() is not None),
            (f"complete checkpoint(s) {', '.join(untracked)} without a tracker", bool(untracked)),
            ("an old-layout checkpoint/", os.path.isdir(os.path.join(a.save_dir, "checkpoint"))),
            (METRICS_FILE, os.path.isfile(metrics) and os.path.getsize(metrics) > 0)) if present]
        if used and not (a.resume or a.overwrite):
            raise ValueError(f"save_dir {a.save_dir} already holds a run ({', '.join(used)}): pass "
                             "--resume to continue it, --overwrite to start a new run there (its "
                             "last checkpoint is kept until the new run publishes one), or another "
                             "--save-dir")
        if self.rank == 0:
            protect = []
            if a.resume:
                from megatron_dsv3.checkpoint.commit import resolve_checkpoint

                # (raised here, before recovery deletes anything, not later by load())
                protect.append(resolve_checkpoint(a.resume))
            removed = self.store.recover(protect=protect)
            # (a kill while the metrics were rewritten on resume leaves their temporary copy)
            for name in sorted(os.listdir(a.save_dir)) if os.path.isdir(a.save_dir) else []:
                if name.startswith(f".{METRICS_FILE}.tmp-"):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(a.save_dir, name))
                    removed.append(name)
            if removed:
                self.log(f"cleared {len(removed)} leftover(s) of interrupted saves in "
                         f"{self.store.root}: {', '.join(removed)}")
        dist.barrier()

    def architecture(self) -> Dict:
        """Config fields that shape the weights or the routing; a resume must not change them."""
        return {f: getattr(self.config, f, None) for f in ARCHITECTURE_FIELDS}

    def save(self) -> str:
        """Publish a checkpoint of this step in save_dir/checkpoints (commit protocol of
        megatron_dsv3.checkpoint.commit): per-rank files <step dir>/rank<r>.pt (model chunks with
        router biases, optimizer shard, step, RNG, arguments, architecture) are written into a
        partial directory; rank 0 adds the manifest, renames it into place and points the tracker
        at it. A kill at any instant leaves the previous published checkpoint loadable."""
        from megatron_dsv3.checkpoint.commit import ChecksumFile, fault_point
        from megatron_dsv3.checkpoint.errors import writing

        store = self.store
        box = [store.begin(self.step) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        partial = box[0]
        name = f"rank{self.rank}.pt"
        file = os.path.join(partial, name)
        state = {"models": [m.state_dict() for m in self.models],
                 "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "rng": torch.get_rng_state(), "args": dataclasses.asdict(self.args),
                 "cuda_rng": torch.cuda.get_rng_state() if self._on_cuda() else None,
                 "world_size": dist.get_world_size(), "architecture": self.architecture(),
                 "skipped_steps": self.skipped_steps}
        fault_point(f"rank {self.rank}: write {name}")
        with writing(file):
            with ChecksumFile(file, fault_label=f"rank {self.rank}: {name} half written") as f:
                torch.save(state, f)
        entries = [None] * dist.get_world_size()
        dist.all_gather_object(entries, (name, f.entry()))
        box = [None]
        if self.rank == 0:
            self._copy_metrics_into(partial)
            box = [store.publish(partial, self.step, known=dict(entries),
                                 reset=self._reset_checkpoints, world_size=len(entries))]
            self._reset_checkpoints = False
        dist.broadcast_object_list(box, src=0)
        self.log(f"saved checkpoint {box[0]} (step {self.step})")
        return box[0]

    def _on_cuda(self) -> bool:
        return next(self.models[0].parameters()).is_cuda

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.args.save_dir, METRICS_FILE)

    def _copy_metrics_into(self, partial: str) -> None:
        """The metrics logged up to this step go into the checkpoint (covered by its manifest):
        a resume from it restores them whatever metrics.jsonl holds by then."""
        if os.path.isfile(self.metrics_path):
            shutil.copyfile(self.metrics_path, os.path.join(partial, METRICS_FILE))

    def load(self, path: str):
        from megatron_dsv3.checkpoint.commit import STEP_DIR, resolve_checkpoint, verify_manifest
        from megatron_dsv3.checkpoint.errors import reading

        directory = resolve_checkpoint(path)
        name = f"rank{self.rank}.pt"
        verify_manifest(directory, checksum=[name],
                        required=bool(STEP_DIR.match(os.path.basename(directory))))
        file = os.path.join(directory, name)
        with reading(file, "trainer checkpoint"):
            state = torch.load(file, weights_only=False)
        if state["world_size"] != dist.get_world_size():
            raise ValueError(f"checkpoint {directory} was written by {state['world_size']} ranks; "
                             f"this run has {dist.get_world_size()} (resume with the same layout)")
        saved_args = state.get("args", {})
        for flag in ("pp", "ep", "zero1"):
            saved_value = saved_args.get(flag, TrainArgs.__dataclass_fields__[flag].default)
            if saved_value != getattr(self.args, flag):
                raise ValueError(f"checkpoint {directory} was written with --{flag} "
                                 f"{saved_value}; this run has --{flag} "
                                 f"{getattr(self.args, flag)} (resume with the same layout)")
        changed = [f"--{f.replace('_', '-')}: checkpoint {saved_args[f]!r}, this run "
                   f"{getattr(self.args, f)!r}" for f in RESUME_ARGS
                   if f in saved_args and saved_args[f] != getattr(self.args, f)]
        if changed and not self.args.override_saved_args:
            raise ValueError(f"cannot resume from {directory} with other data or optimizer "
                             "settings: " + "; ".join(changed) + " (the data position is the "
                             "step times the batch shape, and the schedule continues from the "
                             "step: pass the checkpoint's values, or --override-saved-args to "
                             "change them knowingly)")
        if changed:
            self.log("resuming with changed settings (--override-saved-args): "
                     + "; ".join(changed))
        if saved_args.get("steps", self.args.steps) != self.args.steps:
            self.log(f"--steps {saved_args['steps']} -> {self.args.steps}: the learning-rate "
                     "schedule and the order of the data from here on follow the new length")
        saved = state.get("architecture")
        if saved is not None:
            ours = self.architecture()
            diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {ours[k]!r}" for k in ours
                    if k in saved and saved[k] != ours[k]]
            if diff:
                raise ValueError(f"cannot resume from {directory}: the model differs from the one "
                                 "the checkpoint holds in " + "; ".join(diff)
                                 + " (use the checkpoint's settings, or start a new run)")
        for m, sd in zip(self.models, state["models"]):
            m.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self._on_cuda():
            torch.cuda.set_rng_state(state["cuda_rng"])  # (dropout and jitter on the GPU)
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self._resumed_from = directory
        self.log(f"resumed from {directory} at step {self.step}")


METRICS_FILE = "metrics.jsonl"  # the run's metrics, and each checkpoint's copy up to its step

# Config fields compared on resume (an architecture or routing change is refused by name).
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
    "multi_latent_attention", "normalization", "layernorm_epsilon",
    "dsv3_latent_norm_epsilon", "rope_type", "rotary_base",
    "rotary_scaling_factor", "original_max_position_embeddings",
    "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_layer_freq", "moe_router_topk", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_topk_scaling_factor", "moe_router_score_function", "moe_router_enable_expert_bias",
    "mtp_num_layers",
)


def _maybe_inject_fault(rank: int, step) -> None:
    """Fault injection for recovery tests: MEGATRON_DSV3_KILL_RANK_AT="rank:step" makes that rank
    die abruptly after that step, as a crashed node would ("rank:start": in start-up, before
    the run directory's barrier)."""
    spec = os.environ.get("MEGATRON_DSV3_KILL_RANK_AT")
    if spec and spec == f"{rank}:{step}":
        print(f"[fault injection] rank {rank} dies after step {step}", flush=True)
        os._exit(17)
    # MEGATRON_DSV3_STOP_RANK_AT="rank:step": that rank stops (SIGSTOP) after that step, as a
    # hung node would: alive, connections open, no progress (megatron_dsv3.liveness ends the job)
    if os.environ.get("MEGATRON_DSV3_STOP_RANK_AT") == f"{rank}:{step}":
        import signal

        from megatron_dsv3.liveness import flush_active

        print(f"[fault injection] rank {rank} stops (SIGSTOP) after step {step}", flush=True)
        flush_active()  # the others' watchdogs have seen step `step` before it stops
        os.kill(os.getpid(), signal.SIGSTOP)


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
    if last.get("skipped_steps"):
        parts.append(f"{last['skipped_steps']} non-finite step(s) skipped")
    parts.append("load max/mean " + " ".join(f"{v:.2f}" for v in last["expert_load_max_over_mean"]))
    return " | ".join(parts)
