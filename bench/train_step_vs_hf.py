"""Training-step throughput of deepseek-v3-tiny: megatron-dsv3 vs HF transformers' DeepseekV3ForCausalLM
of the same configuration, on CPU, measured in one run.

    python bench/train_step_vs_hf.py [--steps 20] [--batch 8] [--seq 128] [--json]

Both models take AdamW steps on the same batches (forward + backward + optimizer). Ours computes
the LM loss, the MTP loss (HF's model has no MTP in training) and the sequence-wise aux loss; the
ratio is ours / HF in tokens per second (higher is better for us).
"""

import argparse
import json
import os
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


def time_steps(step_fn, steps, warmup=3):
    for _ in range(warmup):
        step_fn()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq", type=positive_int, default=128)
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch threads (0 = torch default)")
    p.add_argument("--no-mtp", action="store_true",
                   help="build ours without MTP (HF's training forward has none)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import DeepseekV3ForCausalLM

    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.world import init_single_process

    init_single_process()
    config = get_config("deepseek-v3-tiny", **({"mtp_num_layers": None} if a.no_mtp else {}))
    torch.manual_seed(0)
    ours = build_model(config)
    hf = DeepseekV3ForCausalLM(hf_config_from(config))
    ids = torch.randint(1, config.vocab_size, (a.batch, a.seq + 1))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(a.seq).expand(a.batch, a.seq)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3)

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
    t_ours = time_steps(step_ours, a.steps)
    t_hf = time_steps(step_hf, a.steps)
    n = a.batch * a.seq
    result = {"mtp": not a.no_mtp, "batch": a.batch, "seq": a.seq, "steps": a.steps, "threads": torch.get_num_threads(),
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
