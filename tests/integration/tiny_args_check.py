"""The tiny DeepSeek-V3 shape as Megatron-LM flags, shared by the *_check.py scripts."""

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
