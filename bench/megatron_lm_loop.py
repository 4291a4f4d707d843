"""Iterations/s of Megatron-LM's own training loop (pretrain()) with our model on CPU/gloo: 1F1B
(Megatron's schedule) and DualPipeV (ours) on the same tiny DeepSeek-V3, PP2 on 2 ranks.

    MEGATRON_LM_PATH=/path/to/Megatron-LM python bench/megatron_lm_loop.py [--iters 40]

Runs `python -m megatron_dsv3.pretrain_gpt` through tests/integration/megatron_lm_run.py (the
CPU redirection of Megatron-LM's CUDA call sites) and reads Megatron's own "elapsed time per
iteration (ms)" log lines; the first 5 iterations (warm-up) are left out, the median of the rest
is reported.
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))


def main():
    from megatron_dsv3.cli import int_range, non_negative_int

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int_range(6, note="the median leaves out iterations "
                                                          "1-5"), default=40)
    parser.add_argument("--mtp-num-layers", type=non_negative_int, default=1)
    opts = parser.parse_args()
    if not os.environ.get("MEGATRON_LM_PATH"):
        parser.error("MEGATRON_LM_PATH is not set: allowed is the path of a Megatron-LM checkout "
                     "(its pretrain_gpt.py and megatron.training)")
    import test_megatron_lm_loop as loop

    base = [a if a != str(loop.ITERS) else str(opts.iters) for a in loop.PP]
    base += ["--pipeline-model-parallel-size", "2", "--mtp-num-layers", str(opts.mtp_num_layers)]
    rows = []
    for schedule in ("1f1b", "dualpipev"):
        got = loop.run_loop("dsv3", base + ["--pipeline-schedule", schedule], 2)
        times = got["elapsed time per iteration (ms)"]
        steady = [times[i] for i in sorted(times) if i > 5]
        ms = statistics.median(steady)
        lm = got["lm loss"]
        rows.append((schedule, ms, 1000.0 / ms, lm[min(lm)], lm[max(lm)]))
    print("| schedule | ms / iteration (median) | iterations/s | lm loss first -> last |")
    print("|---|---|---|---|")
    for schedule, ms, its, first, last in rows:
        print(f"| {schedule} | {ms:.0f} | {its:.2f} | {first:.3f} -> {last:.3f} |")


if __name__ == "__main__":
    main()
