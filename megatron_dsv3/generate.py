"""Command line: generate text from a DeepSeek-V3 checkpoint over the latent cache.

    python -m megatron_dsv3.generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 64
    python -m megatron_dsv3.generate --checkpoint HF_DIR --prompt A --prompt B \\
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--speculative] [--stream]

--checkpoint is an HF DeepSeek-V3 directory (config.json + safetensors; its tokenizer when it has
one) or our trainer's checkpoint (the run directory or its checkpoint/ folder; byte-level). The
prompts run as one batch; --speculative drafts with the MTP module and verifies with the main model
(greedy only) and reports the acceptance rate. Statistics go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from megatron_dsv3.cli import (non_negative_float, non_negative_int, positive_int, probability,
                               seed_int)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_dsv3.generate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="HF checkpoint directory or trainer checkpoint (run dir or checkpoint/)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch of requests")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="tokens to generate per request (integer >= 1)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="number >= 0; 0 = greedy (default)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="integer >= 0; 0 = off")
    p.add_argument("--top-p", type=probability, default=1.0,
                   help="nucleus mass, in (0, 1]; 1 = off (default)")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="seed of the sampling generators (request i uses seed + i), "
                   f"{seed_int.describe()}")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (greedy; prints the acceptance rate)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--block-size", type=positive_int, default=16,
                   help="latent-cache block size (tokens, integer >= 1)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: fp32 for HF checkpoints, the run's for ours)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import megatron_dsv3  # noqa: F401
    from megatron_dsv3.inference import InferenceEngine, Request, SamplingParams
    from megatron_dsv3.inference.loading import load_for_generation
    from megatron_dsv3.world import init_single_process

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        if args.speculative and args.temperature:
            raise ValueError("--speculative verifies greedy choices: use it with --temperature 0")
        sampling = [SamplingParams(args.temperature, args.top_k, args.top_p,
                                   None if args.seed is None else args.seed + i)
                    for i in range(len(args.prompt))]
        init_single_process()
        model, tok = load_for_generation(args.checkpoint, dtype=dtype, device=device)
        stop_ids = [] if args.ignore_eos else tok.eos_token_ids
        requests = [Request(tok.encode(p), args.max_new_tokens, sampling[i], stop_ids, args.stop)
                    for i, p in enumerate(args.prompt)]
        engine = InferenceEngine(model, block_size=args.block_size,
                                 max_batch_size=len(requests), decode=tok.decode)
        start = time.perf_counter()
        if args.stream:
            multi = len(requests) > 1
            if not multi:
                sys.stdout.write(args.prompt[0])
            for event in engine.stream(requests, speculative=args.speculative):
                if multi and event.text:
                    sys.stdout.write(f"[{event.index}] {event.text!r}\n")
                elif event.text:
                    sys.stdout.write(event.text)
                sys.stdout.flush()
            if not multi:
                sys.stdout.write("\n")
            completions = None
        else:
            completions = engine.generate(requests, speculative=args.speculative)
        elapsed = time.perf_counter() - start
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if completions is not None:
        for i, (prompt, c) in enumerate(zip(args.prompt, completions)):
            print(f"=== request {i} ({len(c.tokens)} tokens, {c.finish_reason}) ===")
            print(prompt + c.text)
    s = engine.stats
    line = (f"{len(requests)} request(s), {s.tokens + len(requests)} tokens in {elapsed:.2f} s on "
            f"{device} ({tok.name}); decode: {s.tokens} tokens in {s.forwards} request-forwards")
    if args.speculative:
        line += (f"; MTP acceptance {s.acceptance_rate:.1%} ({s.accepted}/{s.drafted}), "
                 f"{s.tokens_per_forward:.2f} tokens per main-model forward")
    print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
