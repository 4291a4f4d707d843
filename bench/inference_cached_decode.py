"""Cached (latent-cache, absorbed-MLA) decoding against re-running the full forward every step,
on deepseek-v3-tiny with random weights; outputs must be identical.

    python bench/inference_cached_decode.py [--only-absorption | --no-absorption]   # ~4 min

Then, at DeepSeek-V3's per-head attention shapes, decoding with W_UK/W_UV absorbed against
expanding the cached latents into per-head keys and values every step, at 128-2048 positions.
"""
import argparse
_parser = argparse.ArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
_which = _parser.add_mutually_exclusive_group()
_which.add_argument("--only-absorption", action="store_true",
                    help="only the absorbed-vs-expanded comparison at DeepSeek-V3's shapes")
_which.add_argument("--no-absorption", action="store_true",
                    help="only the cached-vs-rerun decoding on deepseek-v3-tiny")
ARGS = _parser.parse_args()
import torch, megatron_dsv3, time
from megatron_dsv3.world import init_single_process
init_single_process()
from megatron_dsv3.configs import get_config
from megatron_dsv3.model import build_model
from megatron_dsv3.inference import InferenceEngine, Request
torch.manual_seed(0)
m = build_model(get_config("deepseek-v3-tiny", init_method_std=0.2)).eval()
def rerun(prompts, n):
    with torch.no_grad():
        ids = torch.tensor(prompts)
        for _ in range(n):
            lg = m(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), None)[:, -1]
            ids = torch.cat([ids, lg.argmax(-1, keepdim=True)], 1)
    return ids[:, len(prompts[0]):].tolist()
def best(f, k=3):
    ts = []
    for _ in range(k):
        t = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t)
    return min(ts), r
import sys
for b, P, N in (() if ARGS.only_absorption else
                ((1, 32, 64), (8, 32, 64), (1, 160, 64), (8, 160, 64))):
    prompts = [torch.randint(1, 255, (P,)).tolist() for _ in range(b)]
    te, res = best(lambda: InferenceEngine(m, block_size=16, max_batch_size=b).generate([Request(p, N) for p in prompts]))
    tr, ref = best(lambda: rerun(prompts, N))
    print(f"batch {b}, prompt {P}, {N} new (best of 3): cached {b*N/te:.0f} tok/s vs full re-run {b*N/tr:.0f} tok/s = {tr/te:.2f}x; identical={[r.tokens for r in res] == ref}", flush=True)

# -- with absorption against without, at several context lengths --------------------------------
# DeepSeek-V3's attention shapes per head (kv_lora_rank 512, nope 128, rope 64, v 128) with 16
# heads at hidden 1024, 2 layers (1 dense, 1 MoE); batch 4; the same latent cache read through
# the absorbed formula or expanded into per-head keys and values every step.
if not ARGS.no_absorption:
    v3_attn = dict(hidden_size=1024, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=512,
                   qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, num_layers=2,
                   moe_layer_freq=[0, 1], ffn_hidden_size=1024, moe_ffn_hidden_size=256,
                   moe_shared_expert_intermediate_size=256, mtp_num_layers=None,
                   max_position_embeddings=4096, init_method_std=0.02)
    torch.manual_seed(0)
    big = build_model(get_config("deepseek-v3-tiny", **v3_attn)).eval()

    def decode_seconds(prompts, absorbed, n=17):
        """Seconds per decode step, timed from the moment every prompt has been prefilled (all
        are admitted together) to the last token; best of 3."""
        best, toks = float("inf"), None
        for _ in range(3):
            eng = InferenceEngine(big, block_size=64, max_batch_size=len(prompts),
                                  num_blocks=len(prompts) * 40)
            eng.decoder.absorbed = absorbed
            out, start = [[] for _ in prompts], None
            for event in eng.stream([Request(p, n) for p in prompts]):
                out[event.index] += event.tokens
                if start is None and all(out):
                    start = time.perf_counter()
            best, toks = min(best, (time.perf_counter() - start) / (n - 1)), out
        return best, toks
    for T in (128, 512, 2048):
        prompts = [torch.randint(1, 255, (T,)).tolist() for _ in range(4)]
        ta, a = decode_seconds(prompts, True)
        te, e = decode_seconds(prompts, False)
        print(f"context {T}, batch 4, V3 attention shapes x16 heads: absorbed {4/ta:.0f} tok/s, "
              f"expanded {4/te:.0f} tok/s = {te/ta:.2f}x; identical={a == e}", flush=True)
