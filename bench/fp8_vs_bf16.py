"""FP8 (DeepSeek's fine-grained recipe, emulated) against BF16 training of deepseek-v3-tiny.

    python bench/fp8_vs_bf16.py [--steps 300] [--last 100] [--seed 1234] [--json] [--plot docs/img/fp8_vs_bf16.png]

Both runs: same seed, same data (the stdlib corpus of the main job), BF16 parameters and
activations (optionally BF16 AdamW moments); the FP8 run additionally quantises every GEMM input of the
linear layers (1x128 activation/gradient tiles, 128x128 weight blocks). Reports the relative loss
difference averaged over the last `--last` steps (the report's figure of merit: below 0.25%).
"""

import argparse
import json
import os
import tempfile

import megatron_dsv3  # noqa: F401
from fp8_runs import run  # bench/fp8_runs.py: shared with bench/fp8_fidelity.py
from megatron_dsv3.cli import check_plot_path, positive_int, seed_int
from megatron_dsv3.training.trainer import TrainArgs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--last", type=positive_int, default=100)
    p.add_argument("--plot", default=None)
    p.add_argument("--bf16-moments", action="store_true", help="AdamW moments in BF16 in both runs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=seed_int, default=TrainArgs.seed,
                   help="initialisation and data seed of both runs")
    p.add_argument("--noise-floor", action="store_true",
                   help="instead of FP8, a second BF16 run with one weight nudged by one BF16 "
                        "step: how far two runs differing by a rounding drift apart")
    a = p.parse_args()
    if a.last > a.steps:
        p.error(f"--last {a.last} is invalid: allowed values are 1 to --steps {a.steps}")
    if a.plot:
        try:
            check_plot_path("--plot", a.plot)
        except ValueError as error:
            p.error(str(error))
    cache = os.path.join(tempfile.gettempdir(), "dsv3_bench_cache")
    bf16 = [r["lm_loss"] for r in run(a.steps, False, cache, a.bf16_moments, a.seed)]
    if a.noise_floor:
        fp8 = [r["lm_loss"] for r in run(a.steps, False, cache, a.bf16_moments, a.seed,
                                         nudged=True, log_prefix="bf16-nudged ")]
    else:
        fp8 = [r["lm_loss"] for r in run(a.steps, True, cache, a.bf16_moments, a.seed)]
    tail = slice(len(bf16) - a.last, len(bf16))
    rel = [abs(f - b) / b for f, b in zip(fp8[tail], bf16[tail])]
    mean_b, mean_f = sum(bf16[tail]) / a.last, sum(fp8[tail]) / a.last
    result = {"seed": a.seed, "compared": "bf16-nudged" if a.noise_floor else "fp8",
              "steps": a.steps, "last": a.last,
              "mean_rel_loss_diff_last": sum(rel) / a.last,
              "rel_diff_of_mean_loss_last": abs(mean_f - mean_b) / mean_b,
              "bf16_loss_last_mean": mean_b, "fp8_loss_last_mean": mean_f,
              "bf16_final": bf16[-1], "fp8_final": fp8[-1]}
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
        steps = list(range(1, a.steps + 1))
        ax.plot(steps, bf16, lw=1, label="BF16")
        ax.plot(steps, fp8, lw=1, label="FP8 (1x128 / 128x128, emulated)")
        ax.set_ylabel("LM loss")
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_title("deepseek-v3-tiny: FP8 vs BF16, same seed and data")
        ax2.plot(steps, [100 * (f - b) / b for f, b in zip(fp8, bf16)], lw=1, color="C2")
        ax2.axhline(0, color="k", lw=0.5)
        ax2.set_ylabel("(FP8-BF16)/BF16 %")
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
