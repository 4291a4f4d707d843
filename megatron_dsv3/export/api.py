"""`export()`: checkpoint in, quantised HF checkpoint out (the command line's body)."""

from __future__ import annotations

import os
import resource
import tempfile
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from megatron_dsv3.checkpoint.commit import recover_directory
from megatron_dsv3.checkpoint.hf_config import DEFAULT_DTYPE
from megatron_dsv3.export.formats import FORMATS, get_format

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json")


def checkpoint_kind(path: str) -> str:
    """'hf' (config.json), 'dist' (a Megatron distributed checkpoint: .metadata, in its own
    directory or in Megatron-LM's layout under a latest_checkpointed_iteration.txt tracker) or
    'trainer' (our trainer's checkpoint or run directory); ValueError naming --checkpoint
    otherwise."""
    from megatron_dsv3.inference.loading import dist_checkpoint_step, trainer_checkpoint_file

    recover_directory(path, clean=False)  # (a directory an interrupted commit left aside)
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint {path!r} does not exist or is not a directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if dist_checkpoint_step(path) is not None:
        return "dist"
    if trainer_checkpoint_file(path) is not None:
        return "trainer"
    raise ValueError(f"--checkpoint {path}: not a checkpoint we read (allowed: an HF directory with "
                     "config.json, a Megatron distributed checkpoint with .metadata (or Megatron-LM's "
                     "directory with latest_checkpointed_iteration.txt naming one), or our "
                     "trainer's checkpoint / run directory)")


def load_model(path: str, dtype: torch.dtype = DEFAULT_DTYPE, hf_config: Optional[str] = None
               ) -> Tuple[torch.nn.Module, Optional[Dict[str, Any]], str]:
    """(model in eval mode, the HF config.json dict to keep non-architecture fields of, kind)."""
    from megatron_dsv3.checkpoint.hf_config import read_hf_config
    from megatron_dsv3.inference.loading import (load_hf_checkpoint, load_trainer_checkpoint,
                                                 trainer_checkpoint_file)
    from megatron_dsv3.world import init_single_process
    import torch.distributed as dist

    if not dist.is_initialized():
        init_single_process()
    kind = checkpoint_kind(path)
    if kind == "hf":
        return load_hf_checkpoint(path, dtype).eval(), read_hf_config(path), kind
    if kind == "trainer":
        return load_trainer_checkpoint(trainer_checkpoint_file(path), dtype).eval(), None, kind
    from megatron_dsv3.checkpoint.convert import dist_to_hf

    with tempfile.TemporaryDirectory() as tmp:  # streamed through the HF layout (tested paths)
        hf_dir = os.path.join(tmp, "hf")
        dist_to_hf(path, hf_dir, hf_config=hf_config, fp8=False, progress=False)
        return load_hf_checkpoint(hf_dir, dtype).eval(), read_hf_config(hf_dir), kind


def export(checkpoint: str, out: str, quant: str, *, calib: int = 64,
           calib_data: Optional[str] = None, calib_seq_length: Optional[int] = None,
           batch_size: int = 4,
           group_size: Optional[int] = None, also_quantize: Sequence[str] = (),
           device: Optional[str] = None, dtype: torch.dtype = DEFAULT_DTYPE,
           hf_config: Optional[str] = None, overwrite: bool = False,
           max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> Dict[str, Any]:
    """Quantise the model of `checkpoint` in format `quant` (formats.FORMATS) calibrated on `calib`
    sequences of `calib_seq_length` tokens (default: 512 or the model's max_position_embeddings,
    whichever is smaller) and write it to `out` as an HF checkpoint. Returns a report (times, sizes, peak
    memory). Everything that can be refused is refused before the model is loaded or calibrated."""
    from megatron_dsv3.export.hf_writer import export_hf
    from megatron_dsv3.export.quantize import (calibration_batches, check_group_size,
                                               check_group_size_offered, check_runs_here,
                                               quantize)
    from megatron_dsv3.checkpoint.commit import check_output_outside_input, check_output_writable

    fmt = get_format(quant)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_group_size_offered(fmt, group_size)
    check_runs_here(fmt, target)
    if not fmt.writable:
        raise ValueError(f"--quant {fmt.name}: modelopt runs it on {target.type}, but the writer "
                         "of its packed tensors is not built yet (it could not be verified without "
                         "a GPU); formats we write: "
                         f"{sorted(n for n, f in FORMATS.items() if f.writable)}")
    check_output_outside_input(checkpoint, out, "--out")
    recover_directory(out, clean=False)  # (an interrupted --overwrite left the old one aside)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it (only once the new "
                         "checkpoint is complete)")
    check_output_writable(out, "--out")
    kind = checkpoint_kind(checkpoint)
    if hf_config is not None and kind != "dist":
        what = {"hf": "an HF checkpoint", "trainer": "our trainer's checkpoint"}[kind]
        raise ValueError(f"--hf-config applies to a distributed checkpoint (which has no "
                         f"config.json); --checkpoint {checkpoint} is {what} and carries its own "
                         "config: drop --hf-config")
    start = time.monotonic()
    model, base_config, kind = load_model(checkpoint, dtype, hf_config)
    group_size = check_group_size(model, fmt, group_size, also_quantize)
    longest = model.config.max_position_embeddings
    if calib_seq_length is None:
        calib_seq_length = min(512, longest)
    elif calib_seq_length > longest:
        raise ValueError(f"--calib-seq-length {calib_seq_length} is invalid for this model: "
                         f"allowed values are 1 to its max_position_embeddings={longest}")
    batches = calibration_batches(model.config, calib_data, calib, calib_seq_length, batch_size,
                                  skip_bytes=getattr(model, "trained_corpus_bytes", 8 << 20))
    model = model.to(target)
    loaded = time.monotonic()
    quantize(model, fmt, batches, group_size=group_size, quantize=also_quantize,
             progress=progress)
    calibrated = time.monotonic()
    extra = [os.path.join(checkpoint, name) for name in TOKENIZER_FILES
             if kind == "hf" and os.path.isfile(os.path.join(checkpoint, name))]
    export_hf(model.cpu(), out, fmt, base_config=base_config, group_size=group_size,
              max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress,
              extra_files=extra)
    written = time.monotonic()
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
               if f.endswith(".safetensors"))
    return {"format": fmt.name, "checkpoint_kind": kind, "device": target.type,
            "group_size": group_size, "calibration_sequences": calib,
            "load_seconds": round(loaded - start, 2), "calibrate_seconds": round(calibrated - loaded, 2),
            "write_seconds": round(written - calibrated, 2),
            "export_seconds": round(written - loaded, 2), "safetensors_bytes": size,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
