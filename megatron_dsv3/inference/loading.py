"""Models and tokenizers for generation from the two checkpoint formats we read.

- an HF DeepSeek-V3 directory (config.json + safetensors): `config_from_hf` + `load_hf`, and the
  directory's own tokenizer when it has one (transformers' AutoTokenizer);
- our trainer's checkpoint (`Trainer.save`: <dir>/rank0.pt holding the model state dicts and the
  TrainArgs the run was made with), given as that directory or as the run directory holding
  `checkpoint/`: the config is rebuilt from the preset and overrides the run used.
Models whose vocabulary is 256 (the tiny byte-level training job) use `ByteTokenizer`; any other
model without a tokenizer of its own loads with none (prompts and outputs are then token ids).
Parameters are bfloat16 unless a dtype is given (checkpoint.hf_config.DEFAULT_DTYPE, the default of
every load path), whatever dtype the checkpoint was stored or trained in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from megatron_dsv3.checkpoint.commit import recover_directory
from megatron_dsv3.checkpoint.errors import CheckpointFileError, reading
from megatron_dsv3.checkpoint.hf_config import DEFAULT_DTYPE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used for generation, with the reason."""


@dataclass
class Tokenizer:
    encode: Callable[[str], List[int]]
    decode: Callable[[List[int]], str]
    eos_token_ids: List[int]
    name: str


def byte_tokenizer() -> Tokenizer:
    from megatron_dsv3.tokenizer import EOD, ByteTokenizer

    tok = ByteTokenizer()
    return Tokenizer(tok.tokenize, tok.detokenize, [EOD], "byte-level (megatron_dsv3.tokenizer)")


def hf_tokenizer(path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    eos = [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
    return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False),
                     lambda ids: tok.decode(ids, skip_special_tokens=True), eos,
                     f"HF tokenizer of {path}")


def trainer_checkpoint_file(path: str) -> Optional[str]:
    """rank0.pt of the trainer checkpoint `path` means (a checkpoint directory, a checkpoint
    root, or a run directory: its latest published checkpoint), verified against its manifest;
    None when `path` holds no trainer checkpoint."""
    from megatron_dsv3.checkpoint.commit import resolve_checkpoint, verify_manifest

    try:
        directory = resolve_checkpoint(path)
    except CheckpointFileError:  # a tracker naming a missing directory: say so
        raise
    except ValueError:  # nothing of ours there
        return None
    verify_manifest(directory, checksum=["rank0.pt"], required=False)
    return os.path.join(directory, "rank0.pt")


def load_trainer_checkpoint(file: str, dtype: torch.dtype = DEFAULT_DTYPE):
    """DeepSeekV3Model with the weights of a single-process trainer checkpoint file, parameters in
    `dtype` (bfloat16 by default, whatever the run trained in)."""
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    try:
        with reading(file, "trainer checkpoint"):  # empty, truncated, not torch.save's
            state = torch.load(file, map_location="cpu", weights_only=False)
    except CheckpointFileError:
        raise
    except Exception as error:  # a foreign pickle (classes we do not have, ...)
        raise CheckpointError(f"{file} is not a readable trainer checkpoint: {error}") from error
    if not isinstance(state, dict) or "models" not in state or "args" not in state:
        raise CheckpointError(f"{file} is not a trainer checkpoint: expected a dict with 'models' "
                              "and 'args' (written by megatron_dsv3.training.trainer.Trainer.save)")
    args = state["args"]
    if args.get("pp", 1) != 1 or args.get("ep", 1) != 1:
        # (data parallelism alone replicates the model: rank 0's file holds all of it)
        raise CheckpointError(
            f"{file} was written by a distributed run (world size {state.get('world_size')}, "
            f"pp={args.get('pp')}, ep={args.get('ep')}) whose rank 0 holds part of the model; "
            "generation loads trainer checkpoints of runs with pp=1 and ep=1 (any number of "
            "data-parallel ranks)")
    overrides = dict(args.get("config_overrides") or {})
    overrides.setdefault("init_seed", args.get("seed", 1234))
    if args.get("fp8"):
        pow2 = args.get("fp8_pow2_scales")
        overrides["dsv3_fp8_recipe"] = "deepseek-pow2" if pow2 else "deepseek"
    overrides.update(bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
                     perform_initialization=False, use_cpu_initialization=True)
    config = get_config(args.get("preset", "deepseek-v3-tiny"), **overrides)
    model = build_model(config)
    try:
        model.load_state_dict(state["models"][0])
    except RuntimeError as error:
        raise CheckpointError(f"{file} does not fit the model its arguments describe: "
                              f"{error}") from error
    # the bytes of the standard-library corpus the run trained on (held-out text starts there)
    model.trained_corpus_bytes = int(args.get("corpus_bytes", 8 << 20))
    return model


def load_hf_checkpoint(path: str, dtype: torch.dtype = DEFAULT_DTYPE):
    """DeepSeekV3Model with an HF checkpoint's weights, parameters in `dtype` (bfloat16 by
    default)."""
    from megatron_dsv3.checkpoint.hf import config_from_hf, load_hf
    from megatron_dsv3.model import build_model

    config = config_from_hf(path, dtype=dtype, perform_initialization=False,
                            use_cpu_initialization=True)
    model = build_model(config)
    load_hf(model, path)
    return model


def dist_checkpoint_step(path: str) -> Optional[str]:
    """The step directory of a distributed checkpoint at `path` (ours or in Megatron-LM's
    layout), or None."""
    from megatron_dsv3.checkpoint.convert import dist_checkpoint_dir

    step = dist_checkpoint_dir(path)
    return step if os.path.isfile(os.path.join(step, ".metadata")) else None


def load_converted_dist_checkpoint(path: str, step: str, dtype: torch.dtype) -> torch.nn.Module:
    """Our model from a distributed checkpoint with the HF config the converter kept."""
    from megatron_dsv3.checkpoint import dist as dist_io
    from megatron_dsv3.checkpoint.convert import HF_CONFIG_FILE
    from megatron_dsv3.checkpoint.hf_config import config_from_hf, read_hf_config
    from megatron_dsv3.model import build_model

    stored = os.path.join(step, HF_CONFIG_FILE)
    if not os.path.isfile(stored):
        raise CheckpointError(f"{step} is a distributed checkpoint without {HF_CONFIG_FILE} (not "
                              "written by our converter): convert it to HF with "
                              "`python -m megatron_dsv3.checkpoint convert --to hf --hf-config "
                              "<config.json>` and generate from that")
    hf = read_hf_config(stored)
    depth = hf.get("num_nextn_predict_layers") or 0
    model = build_model(config_from_hf(hf, dtype=dtype, mtp_num_layers=depth or None,
                                       perform_initialization=False))
    dist_io.load([model], path)
    return model


def load_for_generation(path: str, dtype: torch.dtype = DEFAULT_DTYPE, device=None
                        ) -> Tuple[torch.nn.Module, Optional[Tokenizer]]:
    """(model in eval mode on `device`, Tokenizer or None) from an HF or trainer checkpoint
    directory, parameters in `dtype` (bfloat16 by default). The tokenizer is the checkpoint's own,
    the byte-level one for a 256-token vocabulary, else None (the caller works in token ids).
    Weights are read on the CPU, then moved. Also a distributed checkpoint the converter wrote
    (`convert --to dist`, its config.json kept as hf_config.json), in our or Megatron-LM's layout."""
    recover_directory(path, clean=False)  # (a directory an interrupted commit left aside)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a directory")
    dist_dir = dist_checkpoint_step(path)
    if dist_dir is not None:
        model = load_converted_dist_checkpoint(path, dist_dir, dtype)
        tokenizer = byte_tokenizer() if model.config.vocab_size == 256 else None
    elif os.path.isfile(os.path.join(path, "config.json")):
        model = load_hf_checkpoint(path, dtype)
        if any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            tokenizer = hf_tokenizer(path)
        else:
            tokenizer = byte_tokenizer() if model.config.vocab_size == 256 else None
    else:
        file = trainer_checkpoint_file(path)
        if file is None:
            raise CheckpointError(
                f"{path} is neither an HF checkpoint (no config.json), a converted distributed "
                "checkpoint (no .metadata) nor a trainer checkpoint (no rank0.pt, "
                "checkpoints/latest.json or checkpoint/rank0.pt)")
        model = load_trainer_checkpoint(file, dtype)
        tokenizer = byte_tokenizer() if model.config.vocab_size == 256 else None
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
