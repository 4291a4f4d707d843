"""Shared by the *_check.py scripts: the tiny DeepSeek-V3 shape as Megatron-LM flags, and
Megatron-LM's argument parsing set up the way pretrain() does it, on one CPU rank (gloo)."""

import os
import sys

TINY = ("--num-layers 3 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 160 "
        "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 2 "
        "--multi-latent-attention --q-lora-rank 32 --kv-lora-rank 32 --qk-head-dim 16 "
        "--qk-pos-emb-head-dim 8 --v-head-dim 16 --num-experts 16 --moe-ffn-hidden-size 32 "
        "--moe-shared-expert-intermediate-size 32 --moe-layer-freq ([0]+[1]*2) "
        "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
        "--moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-topk 4 "
        "--moe-router-topk-scaling-factor 2.5 --moe-router-dtype fp32 --normalization RMSNorm "
        "--swiglu --disable-bias-linear --position-embedding-type none "
        "--untie-embeddings-and-output-weights --vocab-size 256 --tokenizer-type NullTokenizer "
        "--transformer-impl local --no-gradient-accumulation-fusion --lr 1e-3 --train-iters 2 "
        "--mock-data --use-cpu-initialization --no-persist-layer-norm").split()


def parse_megatron_args(argv, extra_args_provider=None):
    """Megatron-LM's parse_args + validate_args on `argv` (without the program name), after a
    one-rank gloo process group and Megatron's parallel state; the args are set globally."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    sys.argv = ["pretrain_gpt.py"] + list(argv)
    args = parse_args(extra_args_provider=extra_args_provider)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 2000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    args = validate_args(args, {})
    set_args(args)
    args.padded_vocab_size = args.vocab_size
    return args
