"""Cached (latent-cache, absorbed-MLA) decoding against re-running the full forward every step,
on deepseek-v3-tiny with random weights; outputs must be identical.

    python bench/inference_cached_decode.py     # ~1 min on 2 cores
"""
import torch, megatron_dsv3, time
from megatron_dsv3.training.trainer import init_single_process
init_single_process()
from megatron_dsv3.configs import get_config
from megatron_dsv3.model import build_model
from megatron_dsv3.inference import *
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
for b, P, N in ((1, 32, 64), (8, 32, 64), (1, 160, 64), (8, 160, 64)):
    prompts = [torch.randint(1, 255, (P,)).tolist() for _ in range(b)]
    te, res = best(lambda: InferenceEngine(m, block_size=16, max_batch_size=b).generate([Request(p, N) for p in prompts]))
    tr, ref = best(lambda: rerun(prompts, N))
    print(f"batch {b}, prompt {P}, {N} new (best of 3): cached {b*N/te:.0f} tok/s vs full re-run {b*N/tr:.0f} tok/s = {tr/te:.2f}x; identical={[r.tokens for r in res] == ref}", flush=True)
