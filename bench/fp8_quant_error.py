"""Quantisation error of an FP8 GEMM under four scalings, on activations with outliers.

    python bench/fp8_quant_error.py [--json]

A = activations [M, K], B = weights [N, K] (std 0.02), E4M3 everywhere, errors in float64, at two
shapes (1024 x 1024 x 2048, and 512 tokens through an expert's fc1: N=2048, K=7168), for
per-tensor scaling, per-row scaling (per token / per output channel), DeepSeek-V3's 1x128 tiles
for A with 128x128 blocks for B, and 1x128 tiles for both. Two kinds of outliers:
- outlier tokens (a few rows of A x s): error = mean over rows of each row's relative error,
  so that the loud rows do not hide what happened to the others;
- outlier channels (a few columns of A x s): error of the product restricted to the ordinary
  channels, ||Aq[:, c] Bq[:, c]^T - A[:, c] B[:, c]^T|| / ||A[:, c] B[:, c]^T||, with Aq quantised
  in the presence of the outliers: what the outliers cost everyone else.
"""

import argparse
import json

import torch

import megatron_dsv3  # noqa: F401
from megatron_dsv3.fp8.quant import (
    dequantize_1x128,
    dequantize_128x128,
    quantize_1x128,
    quantize_128x128,
    quantize_per_row,
    quantize_per_tensor,
)

SCHEMES = ("per-tensor", "per-row", "1x128 x 128x128 (DeepSeek-V3)", "1x128 x 1x128")


def quantised(a, b):
    """(deq(A), deq(B)) for each scheme."""
    qa, sa = quantize_per_tensor(a)
    qb, sb = quantize_per_tensor(b)
    out = {"per-tensor": (qa.float() * sa, qb.float() * sb)}
    qa, sa = quantize_per_row(a)
    qb, sb = quantize_per_row(b)
    out["per-row"] = (qa.float() * sa[:, None], qb.float() * sb[:, None])
    tiles_a = dequantize_1x128(*quantize_1x128(a))
    out["1x128 x 128x128 (DeepSeek-V3)"] = (tiles_a, dequantize_128x128(*quantize_128x128(b)))
    out["1x128 x 1x128"] = (tiles_a, dequantize_1x128(*quantize_1x128(b)))
    return out


def token_outliers(M, N, K, n, scale, gen):
    a = torch.randn(M, K, generator=gen)
    a[torch.randperm(M, generator=gen)[:n]] *= scale
    b = torch.randn(N, K, generator=gen) * 0.02
    exact = a.double() @ b.double().t()
    res = {}
    for name, (da, db) in quantised(a, b).items():
        err = (da.double() @ db.double().t() - exact).norm(dim=1) / exact.norm(dim=1)
        res[name] = err.mean().item()
    return res


def channel_outliers(M, N, K, n, scale, gen):
    a = torch.randn(M, K, generator=gen)
    loud = torch.randperm(K, generator=gen)[:n]
    a[:, loud] *= scale
    ordinary = torch.ones(K, dtype=torch.bool)
    ordinary[loud] = False
    b = torch.randn(N, K, generator=gen) * 0.02
    exact = a[:, ordinary].double() @ b[:, ordinary].double().t()
    res = {}
    for name, (da, db) in quantised(a, b).items():
        got = da[:, ordinary].double() @ db[:, ordinary].double().t()
        res[name] = ((got - exact).norm() / exact.norm()).item()
    return res


SHAPES = ((1024, 1024, 2048), (512, 2048, 7168))  # (M tokens, N, K); the second: an expert fc1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for M, N, K in SHAPES:
        for kind, fn in (("tokens", token_outliers), ("channels", channel_outliers)):
            for n, scale in ((0, 1.0), (4, 1e2), (4, 1e3), (4, 1e4), (4, 1e5)):
                if kind == "channels" and n == 0:
                    continue
                rows.append({"outliers": kind, "count": n, "scale": scale, "shape": f"{M}x{N}x{K}",
                             **fn(M, N, K, n, scale, gen)})
    if args.json:
        print(json.dumps(rows))
        return
    print("| M x N x K | outliers (x scale) | " + " | ".join(SCHEMES) + " |")
    print("|---|---|" + "---|" * len(SCHEMES))
    for r in rows:
        label = "none" if r["count"] == 0 else f"{r['count']} {r['outliers']} x{r['scale']:g}"
        print(f"| {r['shape']} | {label} | " + " | ".join(f"{100 * r[k]:.2f}%" for k in SCHEMES)
              + " |")


if __name__ == "__main__":
    main()
