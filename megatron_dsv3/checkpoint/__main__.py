"""Command line: convert between DeepSeek-V3 HF checkpoints and Megatron distributed checkpoints.

    python -m megatron_dsv3.checkpoint convert --to dist --input HF_DIR --output DIST_DIR \\
        [--tp 1 --pp 1 --ep 1] [--dtype bf16]
    python -m megatron_dsv3.checkpoint convert --to hf --input DIST_DIR --output HF_DIR \\
        [--hf-config CONFIG] [--no-fp8] [--max-shard-size 5GB]

HF -> dist writes the chunks the TP x PP x EP layout's ranks hold; a distributed checkpoint is read
back in whatever layout wrote it. Both stream (a few tensors in memory) and show a progress line.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"--max-shard-size {text!r} is invalid: allowed values are a number of bytes with an "
            f"optional unit among {sorted(u for u in _UNITS if u)}")
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_dsv3.checkpoint",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="HF checkpoint <-> Megatron distributed checkpoint")
    c.add_argument("--to", required=True, choices=["dist", "hf"],
                   help="dist: HF -> Megatron distributed checkpoint; hf: the way back")
    c.add_argument("--input", required=True, help="source checkpoint directory")
    c.add_argument("--output", required=True, help="destination directory (written atomically)")
    c.add_argument("--tp", type=int, help="--to dist: tensor-parallel size of the target layout")
    c.add_argument("--pp", type=int, help="--to dist: pipeline-parallel size of the target layout")
    c.add_argument("--ep", type=int, help="--to dist: expert-parallel size of the target layout")
    c.add_argument("--dtype", choices=sorted(DTYPES), help="--to dist: parameter dtype "
                   "(default bf16; the router stays fp32)")
    c.add_argument("--hf-config", help="--to hf: config.json (or HF directory) of the model; "
                   "default: the one stored by the HF -> dist conversion")
    c.add_argument("--no-fp8", action="store_true", help="--to hf: keep the checkpoint's dtype "
                   "instead of DeepSeek's FP8 128x128 blocks")
    c.add_argument("--max-shard-size", type=parse_size, help="--to hf: largest safetensors "
                   "shard (default 5GB)")
    c.add_argument("--allow-unused", action="store_true",
                   help="leave out source tensors the model has no place for (else an error)")
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
        misplaced = [f for f in ("tp", "pp", "ep", "dtype") if getattr(args, f) is not None]
        if misplaced:
            parser.error(f"--{misplaced[0]} applies to --to dist only: a distributed checkpoint is "
                         "read in whatever layout wrote it")
    import torch

    import megatron_dsv3  # noqa: F401  (quiets megatron-core's import notices)
    from megatron_dsv3.checkpoint.convert import dist_to_hf, hf_to_dist

    try:
        if args.to == "dist":
            hf_to_dist(args.input, args.output, tp=args.tp or 1, pp=args.pp or 1,
                       ep=args.ep or 1, dtype=getattr(torch, DTYPES[args.dtype or "bf16"]),
                       allow_unused=args.allow_unused, overwrite=args.overwrite,
                       progress=not args.quiet)
        else:
            dist_to_hf(args.input, args.output, hf_config=args.hf_config, fp8=not args.no_fp8,
                       allow_unused=args.allow_unused, overwrite=args.overwrite,
                       max_shard_bytes=args.max_shard_size or 5 * 10**9, progress=not args.quiet)
    except ValueError as error:  # bad input: the message names it; nothing was written
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
