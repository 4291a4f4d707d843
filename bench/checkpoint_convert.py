"""HF FP8 checkpoint -> Megatron distributed checkpoint -> HF FP8: time and peak memory.

    python bench/checkpoint_convert.py [--gb 2.2] [--workdir /tmp] [--keep] [--json]

Generates a synthetic DeepSeek-V3-layout FP8 checkpoint of about `--gb` GB (random E4M3 weights
with random 128x128 scale_inv blocks, BF16 embedding/head/norms, MTP module included) from a
scaled-up config, then runs the two conversions of the command line, each in its own process:

    python -m megatron_dsv3.checkpoint convert --to dist --input HF --output DIST --tp 2 --ep 4
    python -m megatron_dsv3.checkpoint convert --to hf --input DIST --output HF2

For each it reports wall time and CPU time, MB/s (bytes of the source checkpoint per second of wall
time, and per CPU-second, which a busy shared machine does not distort), and the peak
resident memory of the converting process (VmHWM) as a fraction of the checkpoint size, next to
the resident memory of a process that only imports the same modules (the baseline, measured in the
same run), and the machine's load average (the conversions are CPU-bound: FP8 (de)quantisation). The RSS of each conversion is sampled over time and plotted (docs/img/).
Everything under --workdir is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from megatron_dsv3.checkpoint.commit import check_output_writable  # noqa: E402
from megatron_dsv3.cli import check_plot_path, path_text, positive_float  # noqa: E402


def hf_config(experts: int) -> dict:
    """A DeepSeek-V3 layout scaled down to a few GB: 6 layers (1 dense), MLA with query
    compression, grouped routing, one shared expert, MTP depth 1."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "moe_intermediate_size": 768, "num_hidden_layers": 6, "first_k_dense_replace": 1,
        "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 768,
        "kv_lora_rank": 256, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 16384, "num_nextn_predict_layers": 1,
        "rope_theta": 10000, "rope_interleave": True, "tie_word_embeddings": False,
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "weight_block_size": [128, 128]},
        "torch_dtype": "bfloat16",
    }


def plan_size(config) -> int:
    from megatron_dsv3.checkpoint.hf_model import hf_plan
    from megatron_dsv3.checkpoint.hf_config import config_from_hf
    from megatron_dsv3.checkpoint.mapping import model_maps

    c = config_from_hf(config)
    maps = model_maps(c)
    # as in DeepSeek's release: BF16 next to the FP8 blocks, the router bias in FP32
    dtypes = {k: torch.float32 if k.endswith("expert_bias") else torch.bfloat16 for k in maps}
    return sum(math.prod(s) * torch.empty((), dtype=d).element_size()
               for _, d, s in hf_plan(maps, dtypes, c, fp8=True)), maps, dtypes, c


def random_e4m3(shape, gen) -> torch.Tensor:
    """Uniform random E4M3 bytes, NaN codes (0x7f, 0xff) replaced by zero."""
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    raw[(raw & 0x7F) == 0x7F] = 0
    return raw.view(torch.float8_e4m3fn)


def generate(path: str, config: dict) -> int:
    """Stream the synthetic checkpoint to `path`; returns its size in bytes."""
    from megatron_dsv3.checkpoint.hf_model import hf_plan
    from megatron_dsv3.checkpoint.safetensors_io import ShardedSafetensorsWriter

    size, maps, dtypes, c = plan_size(config)
    plan = hf_plan(maps, dtypes, c, fp8=True)
    os.makedirs(path)
    writer = ShardedSafetensorsWriter(path, plan, max_shard_bytes=4 * 10**9 // 8)
    gen = torch.Generator().manual_seed(0)
    copies = {}
    for name, dtype, shape in plan:
        if name.endswith("embed_tokens.weight") and name != "model.embed_tokens.weight":
            t = copies["model.embed_tokens.weight"]
        elif name.endswith("shared_head.head.weight"):
            t = copies["lm_head.weight"]
        elif dtype == torch.float8_e4m3fn:
            t = random_e4m3(shape, gen)
        elif name.endswith("_scale_inv"):
            t = torch.rand(shape, generator=gen) * 1e-4 + 1e-5
        elif len(shape) == 1:
            t = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            t = (0.02 * torch.randn(shape, generator=gen)).to(dtype)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            copies[name] = t
        writer.write(name, t)
    writer.finish()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return size


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def child(argv) -> None:
    """Run one conversion (or only the imports) in this process and report its peak memory."""
    import megatron_dsv3  # noqa: F401
    from megatron_dsv3.checkpoint.__main__ import main

    import megatron.core.dist_checkpointing  # noqa: F401  (what a conversion imports)
    import megatron_dsv3.checkpoint.convert  # noqa: F401

    start = time.monotonic()
    if argv != ["--baseline"]:
        main(argv)
    seconds = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "vm_hwm_bytes": int(status["VmHWM"].split()[0]) * 1024}))


def run_child(argv, samples):
    """The child's JSON report, sampling its RSS every 0.1 s into `samples` [(t, bytes)]."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
            samples.append((time.monotonic() - start, rss))
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"conversion {argv} failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def plot(samples, size, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, pts in samples.items():
        ax.plot([t for t, _ in pts], [r / 2**30 for _, r in pts], label=label)
    ax.axhline(size / 2**30, color="gray", linestyle="--", label="checkpoint size (FP8 HF)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (GiB)")
    ax.set_title("Streaming conversion: resident memory over time")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=positive_float, default=2.2,
                        help="target FP8 checkpoint size, GB > 0")
    parser.add_argument("--workdir", type=path_text, default="/tmp")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", type=path_text, default=None,
                        help="RSS-over-time plot (e.g. docs/img/checkpoint_convert_rss.png)")
    args = parser.parse_args()
    try:
        if args.plot:
            check_plot_path("--plot", args.plot)
        if not os.path.isdir(args.workdir):
            raise ValueError(f"--workdir {args.workdir}: allowed is an existing directory")
        check_output_writable(os.path.join(args.workdir, "x"), "--workdir")
    except ValueError as error:
        parser.error(str(error))

    experts = 16
    while plan_size(hf_config(experts))[0] < args.gb * 1e9:
        experts += 8
    config = hf_config(experts)
    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="dsv3_ckpt_bench_", dir=args.workdir)
    try:
        hf, dist, back = (os.path.join(work, n) for n in ("hf", "dist", "back"))
        t = time.monotonic()
        size = generate(hf, config)
        generated = time.monotonic() - t
        samples = {}
        base = run_child(["--baseline"], samples.setdefault("imports only", []))
        to_dist = run_child(["convert", "--to", "dist", "--input", hf, "--output", dist, "--tp", "2",
                             "--ep", "4", "--quiet"], samples.setdefault("HF FP8 -> dist (BF16)", []))
        dist_size = dir_bytes(dist)
        to_hf = run_child(["convert", "--to", "hf", "--input", dist, "--output", back, "--quiet"],
                          samples.setdefault("dist (BF16) -> HF FP8", []))
        back_size = dir_bytes(back)
        result = {
            "load_average_before_after": [load_before, os.getloadavg()[0]], "experts": experts, "hf_fp8_bytes": size, "dist_bf16_bytes": dist_size,
            "hf_back_bytes": back_size, "generate_seconds": generated,
            "baseline_vm_hwm_bytes": base["vm_hwm_bytes"],
            "hf_to_dist": dict(to_dist, mb_per_s=size / 1e6 / to_dist["seconds"],
                               mb_per_cpu_s=size / 1e6 / to_dist["cpu_seconds"],
                               peak_over_checkpoint=to_dist["vm_hwm_bytes"] / size,
                               above_baseline_over_checkpoint=(to_dist["vm_hwm_bytes"]
                                                               - base["vm_hwm_bytes"]) / size),
            "dist_to_hf": dict(to_hf, mb_per_s=dist_size / 1e6 / to_hf["seconds"],
                               mb_per_cpu_s=dist_size / 1e6 / to_hf["cpu_seconds"],
                               peak_over_checkpoint=to_hf["vm_hwm_bytes"] / size,
                               above_baseline_over_checkpoint=(to_hf["vm_hwm_bytes"]
                                                               - base["vm_hwm_bytes"]) / size),
        }
        if args.plot:
            plot({k: v for k, v in samples.items() if k != "imports only"}, size, args.plot)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    gb = 1e9
    print(f"synthetic FP8 checkpoint: {size / gb:.2f} GB ({experts} experts/layer); dist (BF16) "
          f"{dist_size / gb:.2f} GB; back to FP8 {back_size / gb:.2f} GB; imports alone "
          f"{base['vm_hwm_bytes'] / 2**20:.0f} MiB resident; load average "
          f"{result['load_average_before_after'][0]:.1f} -> {result['load_average_before_after'][1]:.1f}"
          f" on {os.cpu_count()} cores")
    print("| direction | wall s | CPU s | MB/s (source bytes) | MB per CPU-second | peak RSS | "
          "peak / checkpoint | (peak - imports) / checkpoint |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in (("HF FP8 -> dist BF16 (TP2 EP4)", result["hf_to_dist"]),
                     ("dist BF16 -> HF FP8", result["dist_to_hf"])):
        print(f"| {label} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['mb_per_s']:.0f} | "
              f"{r['mb_per_cpu_s']:.0f} | "
              f"{r['vm_hwm_bytes'] / 2**20:.0f} MiB | {r['peak_over_checkpoint']:.3f} | "
              f"{r['above_baseline_over_checkpoint']:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
