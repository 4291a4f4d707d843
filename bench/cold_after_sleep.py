"""What a thread pays for its first work after a sleep: each small operation timed the first and the
second time after sleeping, for several sleep lengths (medians over --reps).

    python bench/cold_after_sleep.py [--sleep-ms 0 2 20] [--reps 30] [--json]

On a small shared VM the first operations after a 20 ms sleep run several times slower than the
same operations warm (caches refilled by other work meanwhile): in the time-dilated pipeline
benchmark every operation of every rank starts after such a sleep, so its host time is set by the
code and data it touches, not by the instructions it runs warm.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dsv3.cli import non_negative_float, positive_int  # noqa: E402


def _operations():
    t, o = torch.ones(4, 1, 16), torch.empty(4, 1, 16)
    return {"tensor op with a new output (t * 1.0)": lambda: t * 1.0,
            "in-place tensor op (o.add_(1.0))": lambda: o.add_(1.0),
            "torch.empty(4)": lambda: torch.empty(4),
            "tensor.detach()": lambda: t.detach(),
            "Python list of 50 ints": lambda: [i for i in range(50)]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sleep-ms", type=non_negative_float, nargs="+", default=[0.0, 2.0, 20.0])
    p.add_argument("--reps", type=positive_int, default=30)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for sleep_ms in a.sleep_ms:
        for name, op in _operations().items():
            first, second = [], []
            for _ in range(a.reps):
                time.sleep(sleep_ms / 1e3)
                t0 = time.perf_counter()
                op()
                t1 = time.perf_counter()
                op()
                t2 = time.perf_counter()
                first.append(t1 - t0)
                second.append(t2 - t1)
            rows.append({"sleep_ms": sleep_ms, "operation": name,
                         "first_us": statistics.median(first) * 1e6,
                         "second_us": statistics.median(second) * 1e6})
    if a.json:
        print(json.dumps(rows))
        return
    print("| sleep before (ms) | operation | first after the sleep (us) | second (us) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['sleep_ms']:g} | {r['operation']} | {r['first_us']:.1f} | "
              f"{r['second_us']:.1f} |")


if __name__ == "__main__":
    main()
