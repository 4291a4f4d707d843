"""MTP speculative decoding against plain greedy (cached) and full re-runs, on deepseek-v3-tiny
trained for 30 steps on a repeated sentence (so the MTP head has something to predict);
reports acceptance rate and tokens per main-model forward; outputs must be identical.

    python bench/inference_speculative.py       # ~1 min on 2 cores
"""
import argparse
argparse.ArgumentParser(description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
import torch, megatron_dsv3, time, statistics
from megatron_dsv3.world import init_single_process
init_single_process()
from megatron_dsv3.configs import get_config
from megatron_dsv3.model import build_model
from megatron_dsv3.inference import InferenceEngine, Request
torch.manual_seed(0)
from megatron_dsv3.testing.tiny_training import train_on_repeated_text
SENTENCE = b"the quick brown fox jumps over the lazy dog; "
model = train_on_repeated_text(build_model(get_config("deepseek-v3-tiny")), SENTENCE)
def rerun(prompts, n):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, -1].argmax()))
            out.append(ids[len(p):])
    return out
def best(f, k=3):
    ts = []
    for _ in range(k):
        t = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t)
    return min(ts), r
for prompts in ([b"the quick"], [b"the quick", b"over the lazy dog; the", b"fox jumps", b"xyz q"]):
    N = 64
    reqs = [Request(list(p), N) for p in prompts]
    tp, plain = best(lambda: InferenceEngine(model, block_size=16).generate(reqs))
    eng = InferenceEngine(model, block_size=16)
    ts, spec = best(lambda: InferenceEngine(model, block_size=16).generate(reqs, speculative=True))
    eng.generate(reqs, speculative=True)
    tr, ref = best(lambda: rerun(prompts, N), 1)
    n = len(prompts) * N
    print(f"{len(prompts)} request(s) x {N} tokens: full re-run {n/tr:.0f} tok/s, cached greedy {n/tp:.0f} tok/s, "
          f"MTP speculative {n/ts:.0f} tok/s (acceptance {eng.stats.acceptance_rate:.1%}, {eng.stats.tokens_per_forward:.2f} tok/forward); "
          f"identical: {[r.tokens for r in plain] == [r.tokens for r in spec] == ref}")
