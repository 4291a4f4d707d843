"""Command line: generate text from a DeepSeek-V3 checkpoint over the latent cache.

    python -m megatron_dsv3.generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 64
    python -m megatron_dsv3.generate --checkpoint HF_DIR --prompt A --prompt B \\
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--speculative] [--stream]
    python -m megatron_dsv3.generate --checkpoint HF_DIR --prompt-ids 1,2,3 --prompt-ids 7,8

--checkpoint is an HF DeepSeek-V3 directory (config.json + safetensors; its tokenizer when it has
one) or our trainer's checkpoint (the run directory or its checkpoint/ folder; byte-level). A
prompt is text (--prompt, needs a tokenizer: the checkpoint's, or byte-level for a 256-token
vocabulary) or token ids (--prompt-ids, any checkpoint); a prompt given as ids is answered in ids.
The prompts run as one batch, in command-line order; --speculative drafts with the MTP module and
verifies with the main model (greedy only) and reports the acceptance rate. Parameters are
bfloat16 unless --dtype says otherwise. Statistics go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from megatron_dsv3.cli import (check_device, int_range, non_negative_float, non_negative_int,
                               path_text, positive_int, probability, seed_int)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_DTYPE = "bf16"  # = megatron_dsv3.checkpoint.hf_config.DEFAULT_DTYPE (not imported: torch)


def token_ids(text: str) -> List[int]:
    """argparse type of --prompt-ids: comma-separated integers >= 0 (the upper bound, the
    vocabulary size, is checked once the checkpoint is loaded: `check_token_ids`)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        shown = text if text and not any(c.isspace() for c in text) else repr(text)
        raise argparse.ArgumentTypeError(f"{shown} is invalid: allowed values are comma-separated "
                                         f"{non_negative_int.describe()}, e.g. 1,2,3")
    return [non_negative_int(p) for p in parts]


def check_token_ids(ids: List[int], vocab_size: int) -> None:
    """ValueError naming --prompt-ids and the allowed range unless every id is < vocab_size."""
    allowed = int_range(0, vocab_size - 1, note=f"the model's vocabulary has {vocab_size} tokens")
    for t in ids:
        allowed.check("--prompt-ids", t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_dsv3.generate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=path_text, required=True,
                   help="HF checkpoint directory, trainer checkpoint (run dir or checkpoint/) or "
                   "distributed checkpoint written by `convert --to dist`")
    p.add_argument("--prompt", action="append", dest="prompts", default=[],
                   help="prompt text; repeat for a batch of requests")
    p.add_argument("--prompt-ids", action="append", dest="prompts", type=token_ids,
                   help="prompt as comma-separated token ids in [0, vocabulary size), e.g. "
                   "1,2,3; repeatable, mixes with --prompt; answered in token ids")
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
    p.add_argument("--dtype", choices=sorted(DTYPES), default=DEFAULT_DTYPE,
                   help=f"parameter dtype, for every checkpoint (default: {DEFAULT_DTYPE})")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompts:
        parser.error("a prompt is needed: allowed are one or more --prompt TEXT or "
                     "--prompt-ids 1,2,3")
    if any(stop == "" for stop in args.stop):
        parser.error("--stop '' is invalid: allowed are non-empty strings (an empty one ends "
                     "every request after its first token)")
    if args.temperature == 0:
        ignored = [flag for flag, given in (("--top-k", args.top_k != 0),
                                            ("--top-p", args.top_p != 1.0),
                                            ("--seed", args.seed is not None)) if given]
        if ignored:
            parser.error(f"{' '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} to "
                         "sampling: allowed with --temperature > 0 (the default 0 is greedy)")
    import torch

    try:
        check_device("--device", args.device)
    except ValueError as error:
        parser.error(str(error))

    import megatron_dsv3  # noqa: F401
    from megatron_dsv3.inference import InferenceEngine, Request, SamplingParams
    from megatron_dsv3.inference.engine import request_blocks
    from megatron_dsv3.inference.loading import load_for_generation
    from megatron_dsv3.world import init_single_process

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    as_ids = [not isinstance(p, str) for p in args.prompts]  # answered in token ids
    try:
        if args.speculative and args.temperature:
            raise ValueError("--speculative verifies greedy choices: use it with --temperature 0")
        sampling = [SamplingParams(args.temperature, args.top_k, args.top_p,
                                   None if args.seed is None else args.seed + i)
                    for i in range(len(args.prompts))]
        init_single_process()
        model, tok = load_for_generation(args.checkpoint, dtype=dtype, device=device)
        prompts = [_prompt_ids(p, tok, model.config.vocab_size, args.checkpoint)
                   for p in args.prompts]
        stop_ids = [] if args.ignore_eos or tok is None else tok.eos_token_ids
        requests = [Request(p, args.max_new_tokens, sampling[i], stop_ids, args.stop)
                    for i, p in enumerate(prompts)]
        decode = None if tok is None else tok.decode
        # every request runs at once: room for all of them at their full length (the engine's
        # default holds max_batch_size requests of up to 4096 positions each)
        if args.block_size > model.config.max_position_embeddings:  # (sized before any memory)
            raise ValueError(f"--block-size {args.block_size} is invalid: allowed values are 1.."
                             f"{model.config.max_position_embeddings} (max_position_embeddings: "
                             "no request holds more positions; each block holds block-size)")
        # (a request longer than the model's positions is refused by the engine before it runs;
        # sized at that bound, a huge --max-new-tokens cannot ask for the memory first)
        num_blocks = sum(request_blocks(r, args.block_size,
                                        model.config.max_position_embeddings) for r in requests)
        engine = InferenceEngine(model, block_size=args.block_size, num_blocks=num_blocks,
                                 max_batch_size=len(requests), decode=decode)
        start = time.perf_counter()
        if args.stream:
            _stream(engine, requests, args.prompts, as_ids, args.speculative)
            completions = None
        else:
            completions = engine.generate(requests, speculative=args.speculative)
        elapsed = time.perf_counter() - start
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if completions is not None:
        for i, (prompt, c) in enumerate(zip(args.prompts, completions)):
            print(f"=== request {i} ({len(c.tokens)} tokens, {c.finish_reason}) ===")
            print(_ids(prompt + c.tokens) if as_ids[i] else prompt + c.text)
    s = engine.stats
    name = "no tokenizer: token ids" if tok is None else tok.name
    line = (f"{len(requests)} request(s), {s.tokens + len(requests)} tokens in {elapsed:.2f} s on "
            f"{device} ({name}); decode: {s.tokens} tokens in {s.forwards} request-forwards")
    if args.speculative:
        line += (f"; MTP acceptance {s.acceptance_rate:.1%} ({s.accepted}/{s.drafted}), "
                 f"{s.tokens_per_forward:.2f} tokens per main-model forward")
    print(line, file=sys.stderr)
    return 0


def _ids(tokens: List[int]) -> str:
    return ",".join(map(str, tokens))


def _prompt_ids(prompt, tok, vocab_size: int, checkpoint: str) -> List[int]:
    """Token ids of a --prompt (text, through the tokenizer) or a --prompt-ids (checked against
    the vocabulary)."""
    if not isinstance(prompt, str):
        check_token_ids(prompt, vocab_size)
        return prompt
    if tok is None:
        from megatron_dsv3.inference.loading import TOKENIZER_FILES

        raise ValueError(f"--prompt needs a tokenizer: {checkpoint} has none "
                         f"({', '.join(TOKENIZER_FILES)}) and its vocabulary ({vocab_size}) is "
                         "not byte-level (256); give the prompt as token ids instead: "
                         "--prompt-ids 1,2,3")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # (bytes the shell passed that are not UTF-8)
        raise ValueError(f"--prompt {prompt!r} is invalid: allowed is UTF-8 text (position "
                         f"{error.start} is not); give raw token ids with --prompt-ids") from None
    return tok.encode(prompt)


def _stream(engine, requests, prompts, as_ids, speculative: bool) -> None:
    """Print tokens as they come: one request inline (its prompt first), several one line per
    event tagged with the request's index; text, or token ids for a prompt given as ids."""
    multi = len(requests) > 1
    if not multi:
        sys.stdout.write(_ids(prompts[0]) if as_ids[0] else prompts[0])
    for event in engine.stream(requests, speculative=speculative):
        if as_ids[event.index]:
            new = _ids(event.tokens)
            out = f"[{event.index}] {new}\n" if multi else "," + new
        elif event.text:
            out = f"[{event.index}] {event.text!r}\n" if multi else event.text
        else:
            continue
        sys.stdout.write(out)
        sys.stdout.flush()
    if not multi:
        sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
