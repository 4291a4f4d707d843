"""The tiny training job: DeepSeek-V3 on Megatron's data path, single process on CPU (or one GPU).

Each step: `micro_batches` forward/backward passes (LM loss + MTP loss + sequence-wise aux loss),
gradient clipping, AdamW, then the aux-loss-free bias update from the step's expert loads.
Logs per interval: LM loss, MTP loss, aux loss, tokens/s and expert-load max/mean per MoE layer;
writes metrics.jsonl, a loss-curve plot, an expert-load heatmap and a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Dict, List, Optional

import torch

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
    cache_dir: str = "runs/cache"
    corpus_bytes: int = 8 << 20
    recompute: bool = False
    config_overrides: Dict = dataclasses.field(default_factory=dict)


def init_single_process():
    """A one-rank gloo world and Megatron's parallel_state (all sizes 1), if not set up yet."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args: TrainArgs):
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def moe_layers(model):
    """(global layer number, DeepSeekMoE) of every MoE layer, MTP layers included."""
    from megatron_dsv3.moe.layer import DeepSeekMoE

    return [(m.layer_number, m) for m in model.modules() if isinstance(m, DeepSeekMoE)]


def expert_load_stats(model) -> List[Dict[str, float]]:
    """max/mean of each MoE layer's token counts since the last bias update (1.0 = balanced)."""
    stats = []
    for layer_number, moe in moe_layers(model):
        load = moe.router.local_tokens_per_expert
        mean = load.mean().item()
        stats.append({"layer": layer_number, "load": load.tolist(),
                      "max_over_mean": (load.max().item() / mean) if mean > 0 else 0.0})
    return stats


class Trainer:
    def __init__(self, args: TrainArgs, log=print):
        from megatron_dsv3.configs import get_config
        from megatron_dsv3.model import build_model
        from megatron_dsv3.training.data import build_indexed_corpus, build_train_dataset

        self.args, self.log = args, log
        init_single_process()
        torch.manual_seed(args.seed)
        overrides = dict(args.config_overrides)
        overrides.setdefault("init_seed", args.seed)
        if args.recompute:
            overrides.update(recompute_granularity="selective",
                             recompute_modules=["layernorm", "mla_up_proj", "moe_act"])
        self.config = get_config(args.preset, **overrides)
        self.model = build_model(self.config)
        self.optimizer = make_optimizer(self.model, args)
        prefix = build_indexed_corpus(args.cache_dir, args.corpus_bytes, log=log)
        samples = args.steps * args.micro_batches * args.micro_batch_size
        dataset = build_train_dataset(prefix, args.seq_length, samples, args.seed, args.cache_dir)
        self.loader = iter(torch.utils.data.DataLoader(
            dataset, batch_size=args.micro_batch_size, shuffle=False, drop_last=True))
        self.step = 0
        self.history: List[Dict] = []
        n_params = sum(p.numel() for p in self.model.parameters())
        log(f"model: {args.preset}, {n_params / 1e6:.2f}M parameters, "
            f"{self.config.num_layers} layers (+{self.config.mtp_num_layers or 0} MTP), "
            f"{self.config.num_moe_experts} experts top-{self.config.moe_router_topk}")

    def train_step(self) -> Dict:
        args, model = self.args, self.model
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, args)
        scale = torch.tensor(1.0 / args.micro_batches)
        MoEAuxLossAutoScaler.set_loss_scale(scale)
        MTPLossAutoScaler.set_loss_scale(scale)
        lm_loss, tokens, aux = 0.0, 0, 0.0
        start = time.perf_counter()
        for _ in range(args.micro_batches):
            batch = next(self.loader)
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"].float()
            loss = (per_token * mask).sum() / mask.sum()
            (loss / args.micro_batches).backward()
            lm_loss += loss.item() / args.micro_batches
            tokens += batch["tokens"].numel()
            aux += sum(float(r.last_aux_loss) for r in routers_of([model])
                       if r.last_aux_loss is not None) / args.micro_batches
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = expert_load_stats(model)
        update_expert_biases([model], self.config.moe_router_bias_update_rate)
        elapsed = time.perf_counter() - start
        mtp = model.pop_mtp_losses()
        record = {"step": self.step + 1, "lm_loss": lm_loss,
                  "mtp_loss": mtp.tolist() if mtp is not None else None, "aux_loss": aux,
                  "grad_norm": grad_norm, "lr": lr_at(self.step, args),
                  "tokens_per_s": tokens / elapsed,
                  "expert_load_max_over_mean": [l["max_over_mean"] for l in loads],
                  "expert_load": [l["load"] for l in loads],
                  "moe_layers": [l["layer"] for l in loads]}
        self.step += 1
        return record

    def train(self):
        args = self.args
        os.makedirs(args.save_dir, exist_ok=True) if args.save_dir else None
        metrics = open(os.path.join(args.save_dir, "metrics.jsonl"), "w") if args.save_dir else None
        window: List[Dict] = []
        while self.step < args.steps:
            record = self.train_step()
            self.history.append(record)
            window.append(record)
            if metrics:
                metrics.write(json.dumps(record) + "\n")
            if self.step % args.log_interval == 0 or self.step == args.steps:
                self.log(format_record(window))
                window = []
        if metrics:
            metrics.close()
        if args.save_dir:
            self.save(os.path.join(args.save_dir, "checkpoint"))
            from megatron_dsv3.training.plots import plot_expert_load, plot_loss

            plot_loss(self.history, os.path.join(args.save_dir, "loss.png"))
            plot_expert_load(self.history, os.path.join(args.save_dir, "expert_load.png"),
                             num_layers=self.config.num_layers)
        return self.history

    def save(self, path: str):
        """Model (with router biases), optimizer and step, written atomically."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "step": self.step, "args": dataclasses.asdict(self.args)}, tmp)
        os.replace(tmp, path + ".pt")
        self.log(f"saved checkpoint {path}.pt (step {self.step})")


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
    parts += [f"aux {aux:.2e}", f"lr {last['lr']:.2e}", f"{tps:,.0f} tok/s",
              "load max/mean " + " ".join(f"{v:.2f}" for v in last["expert_load_max_over_mean"])]
    return " | ".join(parts)
