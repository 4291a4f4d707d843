"""Post-training quantisation of the main job's model: held-out loss, size, time, peak memory per
format (python -m megatron_dsv3.export), for docs/benchmarks.md.

    python examples/pretrain_tiny.py --save-dir /tmp/exprun          # the main job (300 steps)
    python bench/export_quality.py --run /tmp/exprun [--calib 64] [--heldout-seqs 128]

Each format is exported by the command line in its own process (its peak RSS is that process's);
the held-out loss is measured here on standard-library text after the trainer's corpus (never
trained on, and not the calibration text either: calibration reads the first --calib sequences of
that held-out stream, the loss the next --heldout-seqs), for the BF16 model and for each export
read back through load_hf (dequantised; FP8 activation scales are not applied by our loader: the
loss of the fp8 row is of its weights). Sizes are the safetensors bytes next to BF16's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_FORMATS = ["fp8-block", "fp8", "int8-wo", "int4-awq"]


def safetensors_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from megatron_dsv3.checkpoint.commit import check_output_writable
    from megatron_dsv3.cli import int_range, path_text, positive_int
    from megatron_dsv3.inference.loading import trainer_checkpoint_file

    p.add_argument("--run", type=path_text, required=True,
                   help="run directory of examples/pretrain_tiny.py")
    p.add_argument("--calib", type=positive_int, default=64)
    p.add_argument("--seq-length", type=int_range(2), default=128)
    p.add_argument("--heldout-seqs", type=positive_int, default=128)
    p.add_argument("--group-size", type=positive_int, default=32, help="int4-awq group (tiny: 32)")
    p.add_argument("--formats", nargs="+", choices=CPU_FORMATS, default=CPU_FORMATS)
    p.add_argument("--out", type=path_text, default=None,
                   help="keep the exports here (default: a temp dir)")
    a = p.parse_args()
    if not os.path.isdir(a.run) or trainer_checkpoint_file(a.run) is None:
        p.error(f"--run {a.run}: no trainer checkpoint there (allowed: a run directory of "
                "examples/pretrain_tiny.py, or one of its checkpoints)")
    if a.out:
        try:
            check_output_writable(os.path.join(a.out, "x"), "--out")
        except ValueError as error:
            p.error(str(error))

    import megatron_dsv3  # noqa: F401
    from megatron_dsv3.checkpoint.hf import save_hf
    from megatron_dsv3.inference.loading import load_hf_checkpoint, load_trainer_checkpoint
    from megatron_dsv3.corpus import heldout_batches, heldout_loss
    from megatron_dsv3.world import init_single_process

    init_single_process()
    torch.set_num_threads(2)
    work = a.out or tempfile.mkdtemp(prefix="export_quality.")
    model = load_trainer_checkpoint(trainer_checkpoint_file(a.run), torch.bfloat16).eval()
    # held-out: after the corpus, past the calibration sequences (the export reads the first
    # --calib sequences of the same stream)
    stream = heldout_batches(a.calib + a.heldout_seqs, a.seq_length, 1)
    held = stream[a.calib:]
    held = [{k: torch.cat([b[k] for b in held[i:i + 8]]) for k in held[0]}
            for i in range(0, len(held), 8)]
    bf16_dir = os.path.join(work, "bf16")
    save_hf(model, bf16_dir, fp8=False)
    base = heldout_loss(model, held)
    rows = [{"format": "bf16 (reference)", "loss": base, "delta_pct": 0.0,
             "bytes": safetensors_bytes(bf16_dir)}]
    print(f"bf16: held-out loss {base:.5f}, {rows[0]['bytes'] / 2**20:.2f} MiB", flush=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = []
    for fmt in a.formats:
        out = os.path.join(work, fmt)
        cmd = [sys.executable, "-m", "megatron_dsv3.export", "--checkpoint", a.run, "--quant",
               fmt, "--out", out, "--calib", str(a.calib), "--calib-seq-length",
               str(a.seq_length), "--overwrite", "--quiet"]
        if fmt == "int4-awq":
            cmd += ["--group-size", str(a.group_size)]
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"{fmt}: failed\n{done.stderr}", flush=True)
            failed.append(fmt)
            continue
        report = json.loads(done.stdout)
        loss = heldout_loss(load_hf_checkpoint(out, torch.bfloat16), held)
        row = dict(report, format=fmt, loss=loss, delta_pct=100 * (loss - base) / base,
                   bytes=safetensors_bytes(out), wall_seconds=round(time.monotonic() - start, 1))
        rows.append(row)
        print(f"{fmt}: held-out loss {loss:.5f} ({row['delta_pct']:+.3f}%), "
              f"{row['bytes'] / 2**20:.2f} MiB ({row['bytes'] / rows[0]['bytes']:.2f}x BF16), "
              f"calibrate {report['calibrate_seconds']} s, write {report['write_seconds']} s, "
              f"peak RSS {report['peak_rss_mib']} MiB", flush=True)
    print("\n| format | held-out loss | vs BF16 | size (MiB) | vs BF16 | calibrate + write (s) | "
          "peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = (f"{r['calibrate_seconds']} + {r['write_seconds']}" if "calibrate_seconds" in r
             else "-")
        print(f"| {r['format']} | {r['loss']:.4f} | {r['delta_pct']:+.3f}% | "
              f"{r['bytes'] / 2**20:.2f} | {r['bytes'] / rows[0]['bytes']:.2f}x | {t} | "
              f"{r.get('peak_rss_mib', '-')} |")
    if failed:
        raise SystemExit(f"export failed for {', '.join(failed)} (their errors are above)")


if __name__ == "__main__":
    main()
