"""FP8 fidelity measured so that quantisation error and chaotic divergence come apart (issue 16).

    python bench/fp8_fidelity.py [--part all|weights|seeds] [--weights-model h256] [--steps 500]
        [--every 50] [--seeds 8] [--seed-steps 500] [--workers 2] [--device cpu|cuda]
        [--gemm-backend emulated|torch|te] [--json-out F] [--plot docs/img/fp8_fidelity.png]
    python bench/fp8_fidelity.py --merge seeds.json weights.json --plot docs/img/fp8_fidelity.png

1. Identical weights (`--part weights`): one BF16 training run (`--weights-model`; FP32 with
   `--weights-train fp32`, for larger models on CPUs without BF16 instructions); at every
   `--every` steps its weights are loaded into models that differ only in their GEMMs - FP32
   (reference), BF16 (the run's own), FP8 with float32 scales, FP8 with power-of-2 scales - and
   each is evaluated on the same held-out batches (standard-library files after the corpus the
   trainer reads: never trained on). Reported: (FP8 - BF16) / BF16 per checkpoint and its largest
   magnitude. What FP8 does to the loss, without what training then does with it.
2. Many seeds (`--part seeds`): K seeds of BF16 training, K of FP8 training (seed s of both: the
   same initialisation and data order), and K noise-floor runs (BF16, seed s, one weight nudged by
   one BF16 step before training: the smallest different initialisation). Held-out loss of each
   final model (in the precision it trained in). Reported: each arm's mean with its 95% interval
   (Student's t over seeds), the paired relative difference FP8 vs BF16 per seed with the 95%
   interval of its mean, and the same for the noise floor; plot: training-loss curves (mean and
   95% band per arm) next to the identical-weights differences.

Runs go to `--workers` processes (one torch thread each by default: on 2 CPU cores two
single-threaded runs beat one two-threaded run of these small models). `--device cuda` trains
and evaluates on the GPU with `--gemm-backend` (torch: torch's blockwise F.scaled_mm; te:
Transformer Engine), the same outputs; the default backend is the config's auto choice
(emulated on CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
import sys
import tempfile
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:  # workers (spawned) import this file by path
    sys.path.insert(0, BENCH)

from fp8_runs import RECIPES, SameWeights, heldout_batches, heldout_loss, make_trainer  # noqa: E402
from fp8_runs import mean_ci95, smooth  # noqa: E402

# Model sizes (config overrides of deepseek-v3-tiny: hidden 64, 3 layers, 16 experts top-4).
MODELS = {
    "tiny": {},
    "h128": dict(hidden_size=128, num_layers=4, ffn_hidden_size=320, num_attention_heads=4,
                 q_lora_rank=64, kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=16,
                 v_head_dim=32, num_moe_experts=16, moe_ffn_hidden_size=64,
                 moe_shared_expert_intermediate_size=64),
    "h256": dict(hidden_size=256, num_layers=4, ffn_hidden_size=640, num_attention_heads=4,
                 q_lora_rank=128, kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=16,
                 v_head_dim=32, num_moe_experts=16, moe_ffn_hidden_size=128,
                 moe_shared_expert_intermediate_size=128),
}
# identical-weights variants: same weights, different GEMMs
VARIANTS = {"fp32": dict(dtype=torch.float32), "bf16": {},
            "fp8": dict(recipe=RECIPES["fp8"]), "fp8-pow2": dict(recipe=RECIPES["fp8-pow2"])}
ARMS = ("bf16", "fp8", "noise")  # noise: BF16 with embedding[0, 0] x (1 + 2^-7)


def train_args(a, model: str, steps: int, seed: int, fp8: bool, cache_dir: str,
               bf16: bool = True):
    from megatron_dsv3.training.trainer import TrainArgs

    overrides = dict(MODELS[model])
    if a.gemm_backend:
        overrides["dsv3_gemm_backend"] = a.gemm_backend
    return TrainArgs(steps=steps, bf16=bf16, fp8=fp8, save_dir=None, cache_dir=cache_dir,
                     seed=seed, seq_length=a.seq_length, micro_batch_size=a.batch,
                     warmup_steps=min(20, steps // 10), log_interval=a.log_interval,
                     config_overrides=overrides)


def heldout(a):
    return heldout_batches(a.heldout_seqs, a.seq_length, a.batch)


# -- 1. identical weights -----------------------------------------------------------------------
def identical_weights(a):
    torch.set_num_threads(a.threads * max(1, a.workers))  # one process: all the cores
    args = train_args(a, a.weights_model, a.steps, a.seed, False, a.cache_dir,
                      bf16=a.weights_train == "bf16")
    trainer = make_trainer(args, a.device, log=lambda m: print("[weights] " + m, flush=True))
    same = SameWeights(trainer.config, VARIANTS, heldout(a), a.device, a.gemm_backend)
    rows, start = [], time.time()

    def checkpoint():
        losses = same.losses(trainer.models[0].state_dict())
        row = {"step": trainer.step, **losses,
               **{f"rel_{k}": (losses[k] - losses["bf16"]) / losses["bf16"]
                  for k in ("fp8", "fp8-pow2", "fp32")}}
        rows.append(row)
        print(f"[weights] step {trainer.step:4d} ({time.time() - start:5.0f} s) held-out "
              + " ".join(f"{k} {losses[k]:.5f}" for k in VARIANTS)
              + f" | fp8 {100 * row['rel_fp8']:+.4f}% pow2 {100 * row['rel_fp8-pow2']:+.4f}%"
              f" fp32 {100 * row['rel_fp32']:+.4f}%", flush=True)

    checkpoint()  # the initialisation
    while trainer.step < a.steps:
        trainer.train_step()
        if trainer.step % a.every == 0 or trainer.step == a.steps:
            checkpoint()
            save_partial(a, "weights", weights_summary(a, rows))
    return weights_summary(a, rows)


def weights_summary(a, rows):
    trained = [r for r in rows if r["step"] > 0] or rows
    return {"model": a.weights_model, "steps": a.steps, "every": a.every,
            "trained_in": a.weights_train, "checkpoints": rows,
            "max_abs_rel_fp8": max(abs(r["rel_fp8"]) for r in trained),
            "max_abs_rel_fp8_pow2": max(abs(r["rel_fp8-pow2"]) for r in trained),
            "max_abs_rel_fp32": max(abs(r["rel_fp32"]) for r in trained)}


def save_partial(a, key, value):
    """Rewrite --json-out with what one part has so far (a run cut short still leaves results)."""
    if not a.json_out:
        return
    saved = {}
    if os.path.exists(a.json_out):
        with open(a.json_out) as f:
            saved = json.load(f)
    saved.update({"args": vars(a), key: value})
    with open(a.json_out + ".tmp", "w") as f:
        json.dump(saved, f)
    os.replace(a.json_out + ".tmp", a.json_out)


# -- 2. many seeds ------------------------------------------------------------------------------
_WORKER = {}


def _init_worker(threads: int, ids, cache_dir: str):
    torch.set_num_threads(threads)
    # each worker its own dataset cache: two runs of one seed building Megatron's index files
    # in one directory at the same time would race
    _WORKER["cache_dir"] = f"{cache_dir}_w{ids.get()}"


def seed_run(a, arm: str, seed: int):
    """One run of the many-seeds part: {arm, seed, heldout, curve}."""
    import megatron_dsv3  # noqa: F401

    cache = _WORKER.get("cache_dir", a.cache_dir)
    start = time.time()
    args = train_args(a, a.seeds_model, a.seed_steps, seed, arm == "fp8", cache)
    trainer = make_trainer(args, a.device, nudged=arm == "noise",
                           log=lambda m: print(f"[{arm} seed {seed}] {m}", flush=True))
    history = trainer.train()
    batches = heldout(a)
    return {"arm": arm, "seed": seed, "heldout": heldout_loss(trainer.models[0], batches),
            "curve": [r["lm_loss"] for r in history], "seconds": time.time() - start}


def many_seeds(a):
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    tasks = [(arm, s) for s in seeds for arm in ARMS]
    ctx = multiprocessing.get_context("spawn")
    ids = ctx.Queue()
    for i in range(a.workers):
        ids.put(i)
    runs, start = [], time.time()
    with futures.ProcessPoolExecutor(a.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(a.threads, ids, a.cache_dir)) as pool:
        pending = [pool.submit(seed_run, a, arm, s) for arm, s in tasks]
        for done in futures.as_completed(pending):
            r = done.result()
            runs.append(r)
            elapsed = time.time() - start
            eta = elapsed / len(runs) * (len(tasks) - len(runs))
            print(f"[seeds] done {len(runs)}/{len(tasks)}: {r['arm']} seed {r['seed']} held-out "
                  f"{r['heldout']:.4f} ({r['seconds']:.0f} s); {elapsed:.0f} s elapsed, "
                  f"~{eta:.0f} s left", flush=True)
            save_partial(a, "seed_runs", runs)
    return summarise(runs)


def summarise(runs):
    """Statistics over the seeds whose three arms all finished."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({s for _, s in by if all((arm, s) in by for arm in ARMS)})
    runs = [r for r in runs if r["seed"] in seeds]
    out = {"seeds": seeds, "runs": runs, "arms": {}}
    for arm in ARMS:
        mean, half = mean_ci95([by[arm, s]["heldout"] for s in seeds])
        out["arms"][arm] = {"mean": mean, "ci95": half}
    base = out["arms"]["bf16"]
    for arm in ("fp8", "noise"):
        paired = [(by[arm, s]["heldout"] - by["bf16", s]["heldout"]) / by["bf16", s]["heldout"]
                  for s in seeds]
        mean, half = mean_ci95(paired)
        other = out["arms"][arm]
        unpaired = (other["mean"] - base["mean"]) / base["mean"]
        unpaired_half = (other["ci95"] ** 2 + base["ci95"] ** 2) ** 0.5 / base["mean"]
        out[f"rel_{arm}_vs_bf16"] = {"per_seed": paired, "mean": mean, "ci95": half,
                                     "unpaired_mean": unpaired, "unpaired_ci95": unpaired_half}
    fp8, noise = out["rel_fp8_vs_bf16"], out["rel_noise_vs_bf16"]
    out["targets"] = {
        "fp8_ci_inside_0.25pct": abs(fp8["mean"]) + fp8["ci95"] < 0.0025,
        "fp8_ci_overlaps_zero": abs(fp8["mean"]) <= fp8["ci95"],
        "fp8_ci_no_wider_than_noise": fp8["ci95"] <= noise["ci95"]}
    return out


# -- report -------------------------------------------------------------------------------------
def plot(result, path, smoothing):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = ("weights" in result) + 3 * ("seeds" in result)
    rows = 1 if n < 3 else 2
    fig, axes = plt.subplots(rows, -(-n // rows), figsize=(5.6 * -(-n // rows), 4.2 * rows),
                             squeeze=False)
    axes = list(axes.flat)
    if "weights" in result:
        ax = axes.pop(0)
        w = result["weights"]
        steps = [r["step"] for r in w["checkpoints"]]
        for key, label in (("rel_fp8", "FP8, float32 scales"),
                           ("rel_fp8-pow2", "FP8, pow-2 scales"), ("rel_fp32", "FP32 GEMMs")):
            ax.plot(steps, [100 * r[key] for r in w["checkpoints"]], marker="o", ms=3, label=label)
        for y in (-0.1, 0.1):
            ax.axhline(y, color="r", lw=0.7, ls="--")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel(f"step of the {w.get('trained_in', 'bf16').upper()} run (checkpoint)")
        ax.set_ylabel("held-out loss vs BF16 GEMMs, same weights (%)")
        ax.set_title(f"identical weights ({w['model']}, trained in "
                     f"{w.get('trained_in', 'bf16').upper()})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if "seeds" in result:
        s = result["seeds"]
        ax = axes.pop(0)
        labels = {"bf16": "BF16", "fp8": "FP8 (float32 scales)", "noise": "BF16, nudged init"}
        for arm in ARMS:
            curves = [smooth(r["curve"], smoothing) for r in s["runs"] if r["arm"] == arm]
            steps = range(1, len(curves[0]) + 1)
            stats = [mean_ci95([c[i] for c in curves]) for i in range(len(curves[0]))]
            mean = [m for m, _ in stats]
            ax.plot(steps, mean, lw=1, label=f"{labels[arm]} (K={len(curves)})")
            ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats], alpha=0.25)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training LM loss ({smoothing}-step average)")
        ax.set_title("many seeds: mean and 95% band", fontsize=10)
        # from a tenth into training: the first steps' fall would flatten the differences
        tenth = [mean_ci95([smooth(r["curve"], smoothing)[len(r["curve"]) // 10]
                            for r in s["runs"] if r["arm"] == arm])[0] for arm in ARMS]
        ax.set_ylim(top=max(tenth))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes.pop(0)
        by = {(r["arm"], r["seed"]): smooth(r["curve"], smoothing) for r in s["runs"]}
        for i, arm in enumerate(("fp8", "noise")):
            diffs = [[(x - b) / b for x, b in zip(by[arm, seed], by["bf16", seed])]
                     for seed in s["seeds"]]
            stats = [mean_ci95([100 * d[k] for d in diffs]) for k in range(len(diffs[0]))]
            steps = range(1, len(stats) + 1)
            ax.plot(steps, [m for m, _ in stats], lw=1, color=f"C{i + 1}",
                    label=f"{labels[arm]} - BF16, same seed")
            ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats],
                            color=f"C{i + 1}", alpha=0.25)
        for y in (-0.25, 0.25):
            ax.axhline(y, color="r", lw=0.7, ls="--")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-2, 2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"paired training-loss difference (%), {smoothing}-step average")
        ax.set_title("mean over seeds and 95% band", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes.pop(0)
        for i, arm in enumerate(("fp8", "noise")):
            rel = s[f"rel_{arm}_vs_bf16"]
            ax.scatter([i] * len(rel["per_seed"]), [100 * v for v in rel["per_seed"]], s=12,
                       color=f"C{i + 1}", alpha=0.7)
            ax.errorbar([i + 0.15], [100 * rel["mean"]], yerr=[100 * rel["ci95"]], fmt="o",
                        color="k", capsize=4)
        for y in (-0.25, 0.25):
            ax.axhline(y, color="r", lw=0.7, ls="--")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks([0, 1], ["FP8 vs BF16", "noise floor\n(nudged vs BF16)"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_ylabel("held-out loss, paired by seed (%)")
        ax.set_title("per seed, and mean with 95% CI", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes:  # unused
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result):
    lines = []
    if "weights" in result:
        w = result["weights"]
        lines.append(f"identical weights ({w['model']} trained in {w.get('trained_in', 'bf16')}, "
                     f"{w['steps']} steps, every {w['every']}):")
        lines.append("| step | FP32 | BF16 | FP8 | FP8 pow2 | FP8 vs BF16 | FP8 pow2 vs BF16 | "
                     "FP32 vs BF16 |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in w["checkpoints"]:
            lines.append(f"| {r['step']} | {r['fp32']:.4f} | {r['bf16']:.4f} | {r['fp8']:.4f} | "
                         f"{r['fp8-pow2']:.4f} | {100 * r['rel_fp8']:+.3f}% | "
                         f"{100 * r['rel_fp8-pow2']:+.3f}% | {100 * r['rel_fp32']:+.3f}% |")
        lines.append("max |FP8 vs BF16| over trained checkpoints: "
                     f"{100 * w['max_abs_rel_fp8']:.3f}% (pow2 {100 * w['max_abs_rel_fp8_pow2']:.3f}%, FP32 GEMMs "
                     f"{100 * w['max_abs_rel_fp32']:.3f}%)")
    if "seeds" in result:
        s = result["seeds"]
        lines.append(f"many seeds (K={len(s['seeds'])}):")
        lines.append("| arm | mean held-out loss | 95% CI |")
        lines.append("|---|---|---|")
        for arm in ARMS:
            m = s["arms"][arm]
            lines.append(f"| {arm} | {m['mean']:.4f} | +-{m['ci95']:.4f} |")
        lines.append("| paired relative difference | mean | 95% CI | unpaired mean +- CI |")
        lines.append("|---|---|---|---|")
        for arm in ("fp8", "noise"):
            r = s[f"rel_{arm}_vs_bf16"]
            lines.append(f"| {arm} vs bf16 | {100 * r['mean']:+.3f}% | "
                         f"[{100 * (r['mean'] - r['ci95']):+.3f}%, "
                         f"{100 * (r['mean'] + r['ci95']):+.3f}%] | "
                         f"{100 * r['unpaired_mean']:+.3f}% +- {100 * r['unpaired_ci95']:.3f}% |")
        lines.append("targets: " + ", ".join(f"{k}: {v}" for k, v in s["targets"].items()))
    return "\n".join(lines)


# settings that must agree for seed runs of several files to be pooled
SEED_SETTINGS = ("seeds_model", "seed_steps", "seq_length", "batch", "heldout_seqs", "device",
                 "gemm_backend")


def merge(paths):
    """The parts of earlier --json-out files: the identical-weights part of the last file that
    has one; the seed runs of every file pooled (their runs must share SEED_SETTINGS, and no
    (arm, seed) may come twice), summarised over the seeds whose three arms all finished."""
    result, runs, settings = {}, [], None
    for path in paths:
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            raise SystemExit(f"--merge: {path} is not a --json-out file of this script "
                             f"({error})") from None
        if not isinstance(saved, dict):
            raise SystemExit(f"--merge: {path} is not a --json-out file of this script")
        if "weights" in saved:
            result["weights"] = saved["weights"]
        file_runs = saved["seeds"]["runs"] if "seeds" in saved else saved.get("seed_runs", [])
        if not file_runs:
            continue
        mine = {k: saved.get("args", {}).get(k) for k in SEED_SETTINGS}
        if settings is not None and mine != settings[1]:
            diff = {k: (settings[1][k], mine[k]) for k in SEED_SETTINGS if settings[1][k] != mine[k]}
            raise SystemExit(f"--merge: {path}'s seed runs used other settings than "
                             f"{settings[0]}'s (field: (theirs, this file's)): {diff}")
        settings = settings or (path, mine)
        seen = {(r["arm"], r["seed"]) for r in runs}
        twice = sorted({(r["arm"], r["seed"]) for r in file_runs} & seen)
        if twice:
            raise SystemExit(f"--merge: {path} repeats runs already read (arm, seed): {twice[:5]}")
        runs += file_runs
    if runs:
        result["seeds"] = summarise(runs)
    return result


def main():
    from megatron_dsv3.checkpoint.commit import check_output_writable
    from megatron_dsv3.cli import check_plot_path, positive_int, seed_int

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "weights", "seeds"), default="all")
    p.add_argument("--weights-model", choices=sorted(MODELS), default="h256")
    p.add_argument("--steps", type=positive_int, default=500, help="identical weights: steps")
    p.add_argument("--every", type=positive_int, default=50, help="identical weights: interval")
    p.add_argument("--seed", type=seed_int, default=1234, help="identical weights: run seed")
    p.add_argument("--weights-train", choices=("bf16", "fp32"), default="bf16",
                   help="identical weights: the precision the weights are trained in (every "
                        "checkpoint is evaluated with FP32, BF16 and FP8 GEMMs either way; fp32 "
                        "trains ~10x faster on CPUs without BF16 instructions)")
    p.add_argument("--seeds-model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--seeds", type=positive_int, default=8, help="K: seeds per arm")
    p.add_argument("--first-seed", type=positive_int, default=1,
                   help="seeds first..first+K-1 (more seeds later: --merge pools the files)")
    p.add_argument("--seed-steps", type=positive_int, default=500)
    p.add_argument("--seq-length", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--heldout-seqs", type=positive_int, default=128)
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker")
    p.add_argument("--log-interval", type=positive_int, default=100)
    p.add_argument("--smoothing", type=positive_int, default=20)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gemm-backend", choices=("emulated", "torch", "te"), default=None,
                   help="dsv3_gemm_backend of every model (default: auto)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "dsv3_bench_cache"))
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no runs: merge the parts of earlier --json-out files, plot and report")
    a = p.parse_args()
    try:  # output paths before hours of runs
        if a.plot:
            check_plot_path("--plot", a.plot)
        if a.json_out:
            if not os.path.isdir(os.path.dirname(os.path.abspath(a.json_out))):
                raise ValueError(f"--json-out {a.json_out}: its directory does not exist "
                                 "(allowed: a file in an existing directory)")
            check_output_writable(a.json_out, "--json-out")
    except ValueError as error:
        p.error(str(error))
    if a.part != "weights" and not a.merge and a.seeds < 2:
        p.error(f"--seeds {a.seeds} is invalid: allowed values are integers >= 2 (a 95% interval "
                "needs two seeds per arm)")
    if a.merge:
        result = merge(a.merge)
        if a.plot:
            plot(result, a.plot, a.smoothing)
        print(report(result))
        return
    if a.device != "cpu" and a.workers > 1:
        print(f"--device {a.device}: one worker (the runs share the device)", flush=True)
        a.workers = 1
    import megatron_dsv3  # noqa: F401

    if a.json_out and os.path.exists(a.json_out):
        os.remove(a.json_out)  # save_partial merges into it: start empty
    result = {"args": vars(a)}
    start = time.time()
    if a.part in ("all", "seeds"):  # first: it spawns workers before this process sets up a world
        result["seeds"] = many_seeds(a)
    if a.part in ("all", "weights"):
        result["weights"] = identical_weights(a)
    result["seconds"] = time.time() - start
    for key in ("seeds", "weights", "seconds"):
        if key in result:
            save_partial(a, key, result[key])
    if a.plot:
        plot(result, a.plot, a.smoothing)
    print(report(result))


if __name__ == "__main__":
    main()
