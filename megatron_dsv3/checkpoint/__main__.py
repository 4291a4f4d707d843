"""Command line: convert between DeepSeek-V3 HF checkpoints and Megatron distributed checkpoints.

    python -m megatron_dsv3.checkpoint convert --to dist --input HF_DIR --output DIST_DIR \\
        [--tp 1 --pp 1 --ep 1] [--schedule 1f1b] [--decoder-first-pipeline-num-layers N \\
        --decoder-last-pipeline-num-layers N] [--dtype bf16]
    python -m megatron_dsv3.checkpoint convert --to hf --input DIST_DIR --output HF_DIR \\
        [--hf-config CONFIG] [--no-fp8] [--max-shard-size 5GB]

HF -> dist writes the chunks the TP x PP x EP layout's ranks hold; a distributed checkpoint is read
back in whatever layout wrote it. Both stream (a few tensors in memory) and show a progress line.
The target layout is checked with the planner's and the trainer's rules (megatron_dsv3.configs.
layout): e.g. DeepSeek-V3's 61 layers on --pp 16 need --schedule dualpipev (our even split over its
32 stages) or Megatron's uneven split (--decoder-first/last-pipeline-num-layers, as in
examples/slurm/deepseek_v3_671b.sbatch); the checkpoint's tensors do not depend on either.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional

from megatron_dsv3.cli import path_text, positive_int

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    match = re.fullmatch(r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    size = int(float(match.group(1)) * _UNITS[unit]) if match and unit in _UNITS else 0
    if size < 1:  # 0 would mean "unset" (5GB) further on: refuse it instead
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid: allowed values are a number of bytes >= 1 "
            f"with an optional unit among {sorted(u for u in _UNITS if u)}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsv3.checkpoint",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="HF checkpoint <-> Megatron distributed checkpoint")
    c.add_argument("--to", required=True, choices=["dist", "hf"],
                   help="dist: HF -> Megatron distributed checkpoint; hf: the way back")
    c.add_argument("--input", type=path_text, required=True, help="source checkpoint directory")
    c.add_argument("--output", type=path_text, required=True,
                   help="destination directory (written atomically)")
    c.add_argument("--tp", type=positive_int,
                   help="--to dist: tensor-parallel size of the target layout (>= 1; default 1)")
    c.add_argument("--pp", type=positive_int,
                   help="--to dist: pipeline-parallel size of the target layout (>= 1; default 1)")
    c.add_argument("--ep", type=positive_int,
                   help="--to dist: expert-parallel size of the target layout (>= 1; default 1)")
    c.add_argument("--schedule", "--pipeline-schedule", dest="schedule",
                   choices=("1f1b", "interleaved", "dualpipe", "dualpipev"),
                   help="--to dist: pipeline schedule of the target run, for the layout check "
                   "(default 1f1b)")
    c.add_argument("--decoder-first-pipeline-num-layers", dest="first", type=positive_int,
                   help="--to dist: decoder layers on the first pipeline rank (Megatron's flag)")
    c.add_argument("--decoder-last-pipeline-num-layers", dest="last", type=positive_int,
                   help="--to dist: decoder layers on the last pipeline rank (Megatron's flag)")
    c.add_argument("--virtual-pipeline-model-parallel-size", dest="vpp", type=positive_int,
                   help="--to dist: model chunks per rank under --schedule interleaved")
    c.add_argument("--dtype", choices=sorted(DTYPES), help="--to dist: parameter dtype "
                   "(default bf16; the router stays fp32)")
    c.add_argument("--hf-config", type=path_text,
                   help="--to hf: config.json (or HF directory) of the model; "
                   "default: the one stored by the HF -> dist conversion")
    c.add_argument("--no-fp8", action="store_true", help="--to hf: keep the checkpoint's dtype "
                   "instead of DeepSeek's FP8 128x128 blocks")
    c.add_argument("--max-shard-size", type=parse_size, help="--to hf: largest safetensors "
                   "shard (default 5GB)")
    c.add_argument("--allow-unused", action="store_true",
                   help="leave out source tensors the model has no place for (else an error)")
    c.add_argument("--megatron-release", action="store_true",
                   help="--to dist: in Megatron-LM's layout (OUTPUT/release and a tracker file), "
                        "for Megatron-LM's --pretrained-checkpoint or --load")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (only once the new one is complete)")
    c.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to == "dist":
        misplaced = [f for f in ("hf_config", "max_shard_size") if getattr(args, f) is not None]
        misplaced += ["no_fp8"] if args.no_fp8 else []
        if misplaced:
            parser.error(f"--{misplaced[0].replace('_', '-')} applies to --to hf only")
    else:
        dist_only = {"tp": "--tp", "pp": "--pp", "ep": "--ep", "dtype": "--dtype",
                     "schedule": "--schedule", "first": "--decoder-first-pipeline-num-layers",
                     "last": "--decoder-last-pipeline-num-layers",
                     "vpp": "--virtual-pipeline-model-parallel-size"}
        misplaced = [flag for f, flag in dist_only.items() if getattr(args, f) is not None]
        misplaced += ["--megatron-release"] if args.megatron_release else []
        if misplaced:
            parser.error(f"{misplaced[0]} applies to --to dist only: a distributed checkpoint is "
                         "read in whatever layout wrote it")
    import torch

    import megatron_dsv3  # noqa: F401  (quiets megatron-core's import notices)
    from megatron_dsv3.checkpoint.convert import dist_to_hf, hf_to_dist
    from megatron_dsv3.configs import layout

    try:
        if args.to == "dist":
            hf_to_dist(args.input, args.output, tp=1 if args.tp is None else args.tp,
                       pp=1 if args.pp is None else args.pp, ep=1 if args.ep is None else args.ep,
                       dtype=getattr(torch, DTYPES[args.dtype or "bf16"]),
                       allow_unused=args.allow_unused, overwrite=args.overwrite,
                       progress=not args.quiet, schedule=args.schedule or "1f1b",
                       first=args.first, last=args.last, vpp=args.vpp,
                       megatron_release=args.megatron_release, layout_names=layout.FLAGS)
        else:
            dist_to_hf(args.input, args.output, hf_config=args.hf_config, fp8=not args.no_fp8,
                       allow_unused=args.allow_unused, overwrite=args.overwrite,
                       max_shard_bytes=(5 * 10**9 if args.max_shard_size is None
                                        else args.max_shard_size), progress=not args.quiet)
    except (ValueError, OSError) as error:  # bad input or a full disk: the message names the
        # file; nothing was written
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
