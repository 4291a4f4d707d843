"""Causal attention forward + backward on CPU: torch's flash kernel (v zero-padded to the q/k
head dim, as MLA hands it over) against the blocked form (`_BlockedCausalAttention`: blocks of
query rows against the keys they may see, probabilities kept, v in its own head dim), one
process, median time per call.

    python bench/causal_attention.py [--shape 4,8,256,48,32 --shape 4,8,512,96,64]
        [--blocks 128 64 32] [--reps 30] [--threads 2] [--json]

Each shape is b,heads,s,d,dv; the defaults are the `small` and `medium` sizes of
bench/train_step_vs_hf.py. This measures the calls alone, with warm caches: inside a training
step the balance can differ (docs/benchmarks.md); the step's own A/B decides the default.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_dsv3.attention.core import _BlockedCausalAttention
from megatron_dsv3.cli import non_negative_int, positive_int


def shape_arg(text):
    try:
        b, n, s, d, dv = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is b,heads,s,d,dv "
                                         "(five integers)") from None
    if min(b, n, s, d, dv) < 1 or dv > d:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed are positive sizes "
                                         "with dv <= d")
    return b, n, s, d, dv


def flash(q, k, v, scale):
    """The flash kernel's path: v padded, the padded columns dropped, [s, b, n * dv]."""
    b, n, s, d = q.shape
    dv = v.shape[-1]
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, d - dv)), is_causal=True,
                                         scale=scale)
    return out[..., :dv].permute(2, 0, 1, 3).reshape(s, b, n * dv)


def time_call(fn, inputs, grad, reps):
    times = []
    for _ in range(reps + 2):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        fn().backward(grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=shape_arg, action="append",
                   help="b,heads,s,d,dv (repeatable; default: small and medium)")
    p.add_argument("--blocks", type=positive_int, nargs="+", default=[128, 64, 32],
                   help="query rows per block")
    p.add_argument("--reps", type=positive_int, default=30)
    p.add_argument("--threads", type=non_negative_int, default=2,
                   help="torch threads (0 = torch default)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    shapes = a.shape or [(4, 8, 256, 48, 32), (4, 8, 512, 96, 64)]
    for shape in shapes:
        if any(block >= shape[2] for block in a.blocks):
            p.error(f"--blocks {a.blocks} is invalid for s={shape[2]}: allowed are blocks "
                    "< s (one block is the unblocked formula)")
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for b, n, s, d, dv in shapes:
        torch.manual_seed(0)
        q, k = (torch.randn(b, n, s, d, requires_grad=True) for _ in range(2))
        v = torch.randn(b, n, s, dv, requires_grad=True)
        grad = torch.randn(s, b, n * dv)
        scale = d ** -0.5
        row = {"shape": [b, n, s, d, dv],
               "flash_ms": time_call(lambda: flash(q, k, v, scale), (q, k, v), grad, a.reps)}
        reference = flash(q, k, v, scale)
        for block in a.blocks:
            got = _BlockedCausalAttention.apply(q, k, v, scale, block)
            err = (got - reference).abs().max().item()
            if err > 1e-4:
                raise SystemExit(f"blocked ({block} rows) differs from the kernel by {err}")
            row[f"blocked_{block}_ms"] = time_call(
                lambda: _BlockedCausalAttention.apply(q, k, v, scale, block), (q, k, v), grad,
                a.reps)
        rows.append(row)
        if not a.json:
            cells = ", ".join(f"{key[:-3]} {value:.2f} ms" for key, value in row.items()
                              if key.endswith("_ms"))
            print(f"[{b}, {n}, {s}, {d} / {dv}]: {cells}", flush=True)
    if a.json:
        print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
