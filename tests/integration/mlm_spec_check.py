"""Build our layers through Megatron-LM's own argument parsing and GPT builder (gpt_builders.py),
as `pretrain_gpt.py --spec megatron_dsv3.layer_specs layer_spec ...` does, and compare the result
with DeepSeekV3Model built from the same parsed config. Run as a script: python mlm_spec_check.py
<Megatron-LM checkout> [spec attribute]; prints one JSON line with the findings.
"""

import json
import os
import sys

import megatron_dsv3  # noqa: F401
import megatron.core  # the installed megatron-core, not the checkout's copy

MLM, ATTR = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "layer_spec")
sys.path.insert(0, MLM)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args  # noqa: E402
from megatron.training.global_vars import set_args  # noqa: E402

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
        "--transformer-impl local --no-gradient-accumulation-fusion --lr 1e-3 --train-iters 1 "
        "--mock-data --use-cpu-initialization --no-persist-layer-norm").split()

sys.argv = ["pretrain_gpt.py", "--spec", "megatron_dsv3.layer_specs", ATTR] + TINY
args = parse_args()
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 2000))
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state  # noqa: E402

parallel_state.initialize_model_parallel()
args = validate_args(args, {})
set_args(args)
args.padded_vocab_size = args.vocab_size

from gpt_builders import gpt_builder  # noqa: E402

from megatron_dsv3.model import DeepSeekV3Model  # noqa: E402

torch.manual_seed(0)
mlm_model = gpt_builder(args, True, True)
config = core_transformer_config_from_args(args)
config.vocab_size, config.max_position_embeddings = args.padded_vocab_size, args.seq_length
ours = DeepSeekV3Model(config, mtp_process=False)
missing = ours.load_state_dict(mlm_model.state_dict(), strict=True)

ids = torch.randint(0, 256, (2, 32))
pos = torch.arange(32).expand(2, 32)
mlm_model.eval(), ours.eval()  # Megatron-LM's default dropouts (0.1) are active in training
with torch.no_grad():
    logits_mlm = mlm_model(ids, pos, None)
    logits_ours = ours(ids, pos, None)
mlm_model.train()
loss = mlm_model(ids, pos, None, labels=ids).mean()
loss.backward()
grads = [n for n, p in mlm_model.named_parameters() if p.grad is None]
print(json.dumps({
    "model_class": type(mlm_model).__name__,
    "layer_classes": sorted({type(l).__name__ for l in mlm_model.decoder.layers}),
    "is_moe": [bool(l.is_moe_layer) for l in mlm_model.decoder.layers],
    "max_abs_logit_diff": (logits_mlm - logits_ours).abs().max().item(),
    "loss": loss.item(),
    "params_without_grad": grads,
}))
