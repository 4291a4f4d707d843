"""float32 CPU GEMMs of a linear layer (forward, input gradient, weight gradient): torch's
default kernel (MKL on x86 wheels) against oneDNN's (`megatron_dsv3.core.gemm.matmul_nt`, what
our linear layers use above `ONEDNN_MIN_FLOPS`), one process, median time per call, and the
largest difference from a float64 product (both are float32 GEMMs with float32 accumulation).

    python bench/cpu_gemm.py [--shape 1024,256,512 --shape 4096,7168,2048] [--reps 20]
        [--threads 2] [--json]

Each shape is M,K,N: x [M, K], w [N, K]. The defaults are GEMMs of the `small` and `medium`
benchmark models and one DeepSeek-V3-wide projection.
"""

import argparse
import json
import statistics
import time

import torch

from megatron_dsv3.cli import non_negative_int, positive_int
from megatron_dsv3.core import gemm


def shape_arg(text):
    try:
        m, k, n = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is M,K,N (three "
                                         "integers)") from None
    if min(m, k, n) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed are positive sizes")
    return m, k, n


def median_ms(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=shape_arg, action="append")
    p.add_argument("--reps", type=positive_int, default=20)
    p.add_argument("--threads", type=non_negative_int, default=2,
                   help="torch threads (0 = torch default)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if gemm.ONEDNN_LINEAR is None:
        p.error("this torch has no oneDNN linear kernel (or MEGATRON_DSV3_CPU_GEMM=torch is set)")
    onednn = gemm.ONEDNN_LINEAR
    rows = []
    for m, k, n in a.shape or [(1024, 256, 512), (2048, 512, 1024), (1024, 7168, 2048)]:
        torch.manual_seed(0)
        x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        flops = 2 * m * k * n
        passes = {"fprop": ((x, w), lambda a, b: a @ b.t()),
                  "dgrad": ((dy, w.t()), lambda a, b: a @ b.t()),
                  "wgrad": ((dy.t(), x.t()), lambda a, b: a @ b.t())}
        for name, ((lhs, rhs), plain) in passes.items():
            ref = lhs.double() @ rhs.double().t()
            scale = ref.abs().max().clamp_min(1e-300)
            row = {"shape": [m, k, n], "pass": name}
            for kernel, fn in (("torch", lambda: plain(lhs, rhs)),
                               ("onednn", lambda: onednn(lhs, rhs, None, "none", [], ""))):
                ms = median_ms(fn, a.reps)
                err = ((fn().double() - ref).abs().max() / scale).item()
                row[kernel] = {"ms": round(ms, 3), "gflops": round(flops / ms / 1e6),
                               "max_rel_err": float(f"{err:.2e}")}
            row["speedup"] = round(row["torch"]["ms"] / row["onednn"]["ms"], 2)
            rows.append(row)
            if not a.json:
                print(f"[{m}, {k}] x [{k}, {n}] {name}: torch {row['torch']['gflops']} GFLOP/s, "
                      f"oneDNN {row['onednn']['gflops']} GFLOP/s ({row['speedup']}x); max rel "
                      f"err {row['torch']['max_rel_err']} / {row['onednn']['max_rel_err']}")
    if a.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
