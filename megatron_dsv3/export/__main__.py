"""Command line: quantise a trained DeepSeek-V3 model with nvidia-modelopt and export it.

    python -m megatron_dsv3.export --list-formats [--device cpu]     # what modelopt runs here
    python -m megatron_dsv3.export --checkpoint DIR --quant {fp8-block,fp8,int8-wo,int4-awq,nvfp4} \\
        --out DIR [--calib 64] [--calib-data PREFIX] [--calib-seq-length 512] [--group-size N] \\
        [--also-quantize mtp --also-quantize head] [--format hf] [--dtype bf16] [--device cpu]

--checkpoint: an HF DeepSeek-V3 directory, a Megatron distributed checkpoint (as our converter
writes, with its hf_config.json, or --hf-config), or our trainer's checkpoint / run directory.
--calib-data: a Megatron indexed dataset prefix (PREFIX.bin/.idx, tokenised for the model); byte-
level models (vocabulary 256) default to standard-library text held out from our trainer's corpus.
The router, MTP, embedding and output head stay in high precision unless --also-quantize names
them (mtp, head; the router and embedding never). Whether a format runs here is modelopt's call:
one it cannot run is refused with its reason and the formats that do run. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from megatron_dsv3.checkpoint.__main__ import parse_size
from megatron_dsv3.cli import check_device, path_text, positive_int
from megatron_dsv3.export.formats import FORMATS, OPTIONAL_MODULES

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_dsv3.export",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=path_text,
                   help="HF, distributed or trainer checkpoint (required)")
    p.add_argument("--quant", choices=sorted(FORMATS),
                   help="(required) " + "; ".join(f"{f.name}: {f.description}"
                                                  for f in FORMATS.values()))
    p.add_argument("--out", type=path_text, help="output directory, written atomically (required)")
    p.add_argument("--list-formats", action="store_true",
                   help="print each format and whether modelopt runs it on --device, then exit")
    p.add_argument("--format", default="hf", choices=["hf", "trtllm"],
                   help="hf: HF safetensors + config (what TensorRT-LLM's PyTorch backend, vLLM "
                   "and SGLang load); trtllm: refused with the reason (see docs/deploy.md)")
    p.add_argument("--calib", type=positive_int, default=64, help="calibration sequences (>= 1)")
    p.add_argument("--calib-data", type=path_text,
                   help="Megatron indexed dataset prefix for calibration")
    p.add_argument("--calib-seq-length", type=positive_int, default=None,
                   help="tokens per calibration sequence, 1 to the model's "
                        "max_position_embeddings (default: 512 or that, whichever is smaller)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="calibration micro-batch")
    p.add_argument("--group-size", type=positive_int,
                   help="weight group along the input dimension: " + "; ".join(
                       f"{f.name}: {list(f.group_sizes)}" for f in FORMATS.values()
                       if f.group_sizes))
    p.add_argument("--also-quantize", action="append", default=[],
                   choices=sorted(OPTIONAL_MODULES),
                   help="quantise these high-precision-by-default modules too (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="parameter dtype of the model and of unquantised tensors")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--hf-config", type=path_text,
                   help="config.json for a distributed checkpoint without one")
    p.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9,
                   help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device("--device", args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.list_formats:
        try:
            return list_formats(args.device)
        except ImportError as error:  # (nvidia-modelopt, the [deploy] extra, is missing)
            print(f"error: {error}", file=sys.stderr)
            return 1
    missing = [f"--{f}" for f in ("checkpoint", "quant", "out") if getattr(args, f) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.format == "trtllm":
        parser.error("--format trtllm: TensorRT-LLM serves DeepSeek-V3 from the HF checkpoint (its "
                     "PyTorch backend reads modelopt's unified HF layout): use --format hf; "
                     "modelopt 0.47's TensorRT-LLM checkpoint exporter has no MLA layer to map "
                     "ours to (allowed values: hf)")
    import torch

    import megatron_dsv3  # noqa: F401
    from megatron_dsv3.checkpoint.errors import CheckpointFileError
    from megatron_dsv3.export.api import export

    try:
        report = export(args.checkpoint, args.out, args.quant, calib=args.calib,
                        calib_data=args.calib_data, calib_seq_length=args.calib_seq_length,
                        batch_size=args.batch_size, group_size=args.group_size,
                        also_quantize=args.also_quantize, device=args.device,
                        dtype=getattr(torch, DTYPES[args.dtype]), hf_config=args.hf_config,
                        overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                        progress=not args.quiet)
    except (ValueError, OSError, CheckpointFileError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def list_formats(device: Optional[str]) -> int:
    """One line per format: whether modelopt runs it on the device (its reason when not), whether
    we write and read it back."""
    import torch

    from megatron_dsv3.export.quantize import _probe

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, fmt in FORMATS.items():
        reason = _probe(fmt, target)
        runs = (f"runs on {target.type}" if reason is None else
                f"does not run on {target.type} (modelopt: {reason.rstrip('.')})")
        extra = "" if fmt.writable else "; not written yet (packed writer unverified without a GPU)"
        print(f"{name:10s} {runs}{extra}; {fmt.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
