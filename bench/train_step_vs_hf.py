"""Training-step throughput: megatron-dsv3 vs HF transformers' DeepseekV3ForCausalLM of the same
configuration, on CPU, measured in one run with interleaved A/B timing.

    python bench/train_step_vs_hf.py --size tiny|small|medium [--steps 20] [--no-mtp]
        [--no-aux-loss] [--json]

Sizes (`SIZES`): tiny = deepseek-v3-tiny, batch 8 x 128; small = hidden 256, 4 layers (first
dense), 16 experts top-4, batch 4 x 256; medium = hidden 512, 4 layers, 32 experts top-8,
batch 4 x 512. Both models take AdamW steps on the same batches (forward + backward + optimizer),
float32; the same AdamW kernel on both sides (`--optimizer`, default torch's fused one, as HF's
Trainer and our trainer use). Ours computes the LM loss, the MTP loss unless --no-mtp and the
sequence-wise aux loss unless --no-aux-loss; HF's model computes neither in training, so
`--no-mtp --no-aux-loss` is the equal-work comparison (DeepSeek-V3's aux loss, coefficient
1e-4, costs ours 1-2% of a `small` step). Steps alternate
ours, HF, ours, HF, ... so both see the same machine state; the reported time per step is each
side's median. The ratio is HF time / our time (higher is better for us).
"""

import argparse
import json
import statistics
import time

import torch

import megatron_dsv3  # noqa: F401
from megatron_dsv3.cli import non_negative_int, positive_int


def hf_config_from(config):
    from transformers import DeepseekV3Config

    freq = config.moe_layer_freq
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, moe_intermediate_size=config.moe_ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        n_shared_experts=config.moe_shared_expert_intermediate_size // config.moe_ffn_hidden_size,
        n_routed_experts=config.num_moe_experts, routed_scaling_factor=config.moe_router_topk_scaling_factor,
        kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank,
        qk_rope_head_dim=config.qk_pos_emb_head_dim, v_head_dim=config.v_head_dim,
        qk_nope_head_dim=config.qk_head_dim, n_group=config.moe_router_num_groups,
        topk_group=config.moe_router_group_topk, num_experts_per_tok=config.moe_router_topk,
        first_k_dense_replace=freq.index(1) if isinstance(freq, list) else 0,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.layernorm_epsilon,
        rope_parameters={"rope_type": "yarn", "rope_theta": config.rotary_base,
                         "factor": config.rotary_scaling_factor,
                         "original_max_position_embeddings": config.original_max_position_embeddings,
                         "beta_fast": config.beta_fast, "beta_slow": config.beta_slow,
                         "mscale": config.mscale, "mscale_all_dim": config.mscale_all_dim},
        rope_interleave=True, tie_word_embeddings=False, attn_implementation="sdpa")


# size -> (config overrides of deepseek-v3-tiny, batch, seq); None: the preset itself
SIZES = {
    "tiny": ({}, 8, 128),
    "small": (dict(hidden_size=256, num_layers=4, ffn_hidden_size=512, num_attention_heads=8,
                   q_lora_rank=128, kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=16,
                   v_head_dim=32, num_moe_experts=16, moe_ffn_hidden_size=64,
                   moe_shared_expert_intermediate_size=64, moe_router_topk=4,
                   moe_router_num_groups=4, moe_router_group_topk=2,
                   max_position_embeddings=512), 4, 256),
    "medium": (dict(hidden_size=512, num_layers=4, ffn_hidden_size=1024, num_attention_heads=8,
                    q_lora_rank=256, kv_lora_rank=128, qk_head_dim=64, qk_pos_emb_head_dim=32,
                    v_head_dim=64, num_moe_experts=32, moe_ffn_hidden_size=128,
                    moe_shared_expert_intermediate_size=128, moe_router_topk=8,
                    moe_router_num_groups=8, moe_router_group_topk=4,
                    max_position_embeddings=1024), 4, 512),
}


def time_interleaved(step_a, step_b, steps, warmup=2):
    """Median seconds per step of a and of b, run alternately (a, b, a, b, ...)."""
    for _ in range(warmup):
        step_a(), step_b()
    ta, tb = [], []
    for _ in range(steps):
        for fn, times in ((step_a, ta), (step_b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--batch", type=positive_int, default=None, help="default: the size's")
    p.add_argument("--seq", type=positive_int, default=None, help="default: the size's")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch threads (0 = torch default)")
    p.add_argument("--no-mtp", action="store_true",
                   help="build ours without MTP (HF's training forward has none)")
    p.add_argument("--no-aux-loss", action="store_true",
                   help="build ours without the sequence-wise balancing loss (HF's training "
                        "forward has none; the expert-bias balancing stays on both sides)")
    p.add_argument("--optimizer", choices=("fused", "foreach"), default="fused",
                   help="torch AdamW kernel, the same on both sides (default fused: what HF's "
                        "Trainer uses on torch >= 2.8 and our trainer uses on CPU and CUDA)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import DeepseekV3ForCausalLM

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.world import init_single_process

    overrides, batch, seq = SIZES[a.size]
    a.batch, a.seq = a.batch or batch, a.seq or seq
    init_single_process()
    config = get_config("deepseek-v3-tiny", **overrides,
                        **({"mtp_num_layers": None} if a.no_mtp else {}),
                        **({"moe_aux_loss_coeff": 0.0} if a.no_aux_loss else {}))
    torch.manual_seed(0)
    ours = build_model(config)
    hf = DeepseekV3ForCausalLM(hf_config_from(config))
    ids = torch.randint(1, config.vocab_size, (a.batch, a.seq + 1))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(a.seq).expand(a.batch, a.seq)
    adamw = {"fused": {"fused": True}, "foreach": {"foreach": True}}[a.optimizer]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3, **adamw)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3, **adamw)

    def step_ours():
        loss = ours(tokens, pos, None, labels=labels).mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad()

    def step_hf():
        out = hf(input_ids=tokens, labels=ids[:, :-1].clone())
        out.loss.backward()
        opt_hf.step()
        opt_hf.zero_grad()

    hf.train(), ours.train()
    t_ours, t_hf = time_interleaved(step_ours, step_hf, a.steps)
    n = a.batch * a.seq
    # (read from the model built, not the flags: what ours computed)
    aux_loss = any(coeff > 0 and kind != "none" for m in ours.modules()
                   for kind, coeff in getattr(m, "aux_loss_coeffs", {}).items())
    result = {"size": a.size, "mtp": bool(config.mtp_num_layers), "aux_loss": aux_loss,
              "optimizer": a.optimizer, "batch": a.batch, "seq": a.seq, "steps": a.steps,
              "threads": torch.get_num_threads(),
              "params_ours": sum(p.numel() for p in ours.parameters()),
              "params_hf": sum(p.numel() for p in hf.parameters()),
              "tokens_per_s_ours": n / t_ours, "tokens_per_s_hf": n / t_hf,
              "ratio_ours_over_hf": t_hf / t_ours}
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v:,.2f}" if isinstance(v, float) else f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
