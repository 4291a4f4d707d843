"""Post-training quantisation of our model with nvidia-modelopt: configuration, the check that a
format runs here, calibration data and the calibration loop.

    register()                                  # our modules -> modelopt (modelopt_plugin)
    cfg = mtq_config(fmt, group_size, quantize=("mtp",))
    check_runs_here(fmt, device)                # modelopt decides; its reason when not
    batches = calibration_batches(config, data_prefix, ...)
    quantize(model, fmt, batches, ...)          # mtq.quantize + our calibration loop
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import time
import warnings
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from megatron_dsv3.corpus import windows_to_batches
from megatron_dsv3.export.formats import FORMATS, OPTIONAL_MODULES, Format


class FormatUnavailable(ValueError):
    """A format modelopt cannot run on this machine (with modelopt's reason)."""


def _mtq():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as error:
        raise ImportError("the export needs nvidia-modelopt: pip install 'megatron-dsv3[deploy]' "
                          f"(import failed: {error})") from error
    return mtq


@contextlib.contextmanager
def _quiet(enabled: bool = True):
    """modelopt prints a line per step (inserted quantisers, calibration phases) on stdout: kept
    off stdout always (the command line's JSON report is what stdout holds), shown on stderr
    unless `enabled`."""
    with contextlib.redirect_stdout(io.StringIO() if enabled else sys.stderr):
        yield


def mtq_config(fmt: Format, group_size: Optional[int] = None,
               quantize: Sequence[str] = ()) -> Dict:
    """modelopt's stock configuration of `fmt`, with the weight group size `group_size` and the
    optional modules in `quantize` (keys of OPTIONAL_MODULES: 'mtp', 'head') quantised too."""
    cfg = copy.deepcopy(getattr(_mtq(), fmt.mtq_config))
    unknown = [q for q in quantize if q not in OPTIONAL_MODULES]
    if unknown:
        raise ValueError(f"--also-quantize {unknown[0]!r}: allowed values are "
                         f"{sorted(OPTIONAL_MODULES)}")
    drop = {OPTIONAL_MODULES[q] for q in quantize}
    cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") not in drop
                        or e.get("enable", True)]
    if fmt.layout == "deepseek-fp8" and "mtp" in quantize:
        # DeepSeek's FP8 release keeps each MTP layer's eh_proj in BF16 (checkpoint.mapping's
        # fp8=False), as save_hf(fp8=True) writes it
        cfg["quant_cfg"].append({"quantizer_name": "*eh_proj*", "enable": False})
    if group_size is not None:
        check_group_size_offered(fmt, group_size)
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = group_size
    return cfg


def quantised_linears(model, quantize: Sequence[str] = ()) -> Dict[str, torch.nn.Module]:
    """Our modules a stock configuration quantises (name -> module): linears and routed experts,
    without the output head and MTP unless `quantize` names them. The router is not a linear of
    ours and never gets a quantiser."""
    from megatron_dsv3.core.linear import _ParallelLinear
    from megatron_dsv3.moe.experts import GroupedExperts

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (_ParallelLinear, GroupedExperts)):
            continue
        if name.startswith("mtp.") and "mtp" not in quantize:
            continue
        if name.startswith("output_layer") and "head" not in quantize:
            continue
        out[name] = module
    return out


def input_features(module) -> dict:
    """{name suffix: input features} of each weight of `module` that is packed in groups."""
    weight = getattr(module, "weight", None)
    if weight is None:  # GroupedExperts: fc1 [E, 2F, h], fc2 [E, h, F]; each packed on its own
        return {".fc1": module.fc1_weight.shape[-1], ".fc2": module.fc2_weight.shape[-1]}
    return {"": weight.shape[-1]}


def check_group_size_offered(fmt: Format, group_size: Optional[int]) -> None:
    """ValueError naming --group-size and the allowed values unless `fmt` offers it (None: the
    format's default)."""
    if group_size is None:
        return
    if not fmt.group_sizes:
        grouped = sorted(f.name for f in FORMATS.values() if f.group_sizes)
        raise ValueError(f"--group-size applies to {grouped} only, not --quant {fmt.name}")
    if group_size not in fmt.group_sizes:
        raise ValueError(f"--group-size {group_size} is not offered for --quant {fmt.name}: "
                         f"allowed values are {list(fmt.group_sizes)}")


def check_group_size(model, fmt: Format, group_size: Optional[int],
                     quantize: Sequence[str] = ()) -> Optional[int]:
    """The group size to use (the format's default when None), or a ValueError naming
    --group-size, the first module whose input features it does not divide and the group sizes
    that fit this model."""
    check_group_size_offered(fmt, group_size)
    if not fmt.group_sizes:
        return None
    chosen = fmt.group_sizes[0] if group_size is None else group_size
    modules = quantised_linears(model, quantize)
    widths = {name + suffix: k for name, module in modules.items()
              for suffix, k in input_features(module).items()}
    fits = [g for g in fmt.group_sizes if all(k % g == 0 for k in widths.values())]
    for name, k in widths.items():
        if k % chosen:
            raise ValueError(f"--group-size {chosen}: {name} has {k} input features, not a "
                             f"multiple of it (partial groups cannot be packed); allowed values "
                             f"for this model: {fits or 'none of ' + str(list(fmt.group_sizes))}")
    return chosen


def _probe(fmt: Format, device: torch.device) -> Optional[str]:
    """None if modelopt quantises and runs a small linear in `fmt` on `device`, else its reason."""
    mtq = _mtq()
    probe = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(device)
    x = torch.randn(4, 256, device=device)
    try:
        with _quiet(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (modelopt's notes about the probe's process groups)
            mtq.quantize(probe, copy.deepcopy(getattr(mtq, fmt.mtq_config)), lambda m: m(x))
            probe(x)
    except Exception as error:  # modelopt's own reason, whatever it raises
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__
    return None


def formats_that_run(device: torch.device) -> List[str]:
    return [name for name, fmt in FORMATS.items() if _probe(fmt, device) is None]


def check_runs_here(fmt: Format, device: torch.device) -> None:
    """FormatUnavailable unless modelopt can quantise and run a small linear in `fmt` on `device`
    (its fake-quantisation kernels decide: NVFP4's, for one, need CUDA)."""
    reason = _probe(fmt, device)
    if reason is not None:
        raise FormatUnavailable(
            f"--quant {fmt.name} cannot run on {device.type}: modelopt says: {reason}. "
            f"Formats that run on {device.type}: {formats_that_run(device)}")


# -- calibration data -------------------------------------------------------------------------
def indexed_batches(prefix: str, vocab_size: int, num_sequences: int, seq_length: int,
                    batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Batches of consecutive windows over a Megatron indexed dataset (`prefix`.bin/.idx, as
    Megatron-LM's preprocess_data.py writes them, tokenised for the model): its documents in order,
    joined, cut into `num_sequences` windows of seq_length + 1 tokens."""
    import os

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise ValueError(f"--calib-data {prefix}: {prefix + suffix} does not exist (a Megatron "
                             "indexed dataset prefix: PREFIX.bin and PREFIX.idx)")
    dataset = IndexedDataset(prefix)
    need = num_sequences * (seq_length + 1)
    chunks, have = [], 0
    for i in range(len(dataset)):
        doc = torch.from_numpy(dataset[i].astype("int64"))
        chunks.append(doc)
        have += doc.numel()
        if have >= need:
            break
    if have < need:
        raise ValueError(f"--calib-data {prefix} holds {have} tokens; {num_sequences} sequences of "
                         f"{seq_length} (--calib, --calib-seq-length) need {need}")
    stream = torch.cat(chunks)[:need]
    if int(stream.max()) >= vocab_size or int(stream.min()) < 0:
        raise ValueError(f"--calib-data {prefix} holds token id {int(stream.max())}, outside the "
                         f"model's vocabulary [0, {vocab_size}): tokenise it for this model")
    return windows_to_batches(stream.view(num_sequences, seq_length + 1), batch_size)


def calibration_batches(config, data: Optional[str], num_sequences: int, seq_length: int,
                        batch_size: int, skip_bytes: int = 8 << 20):
    """Calibration batches: the Megatron indexed dataset `data`, or for a byte-level model
    (vocabulary 256, our example trainer's) without one, standard-library text after the first
    `skip_bytes` of the trainer's corpus (held out from its training)."""
    if data is not None:
        return indexed_batches(data, config.vocab_size, num_sequences, seq_length, batch_size)
    if config.vocab_size != 256:
        raise ValueError("--calib-data is required for this model: a Megatron indexed dataset "
                         "prefix (preprocess_data.py output) tokenised for it; only byte-level "
                         "models (vocabulary 256) have a default calibration text")
    from megatron_dsv3.corpus import heldout_batches

    try:
        return heldout_batches(num_sequences, seq_length, batch_size, train_bytes=skip_bytes)
    except ValueError as error:  # (not enough held-out text: name the flags that ask for it)
        raise ValueError(f"--calib {num_sequences} x --calib-seq-length {seq_length} is more than "
                         f"the default calibration text holds ({error}): lower them, or pass "
                         "--calib-data") from error


# -- quantisation -------------------------------------------------------------------------------
def calibration_loop(batches: Sequence[Dict[str, torch.Tensor]], progress: bool = True,
                     stream=None):
    """The forward_loop modelopt calls (once per calibration phase: AWQ runs it more than once)."""
    stream = stream or sys.stderr
    total = sum(b["tokens"].shape[0] for b in batches)

    def loop(model):
        device = next(model.parameters()).device
        start, done = time.monotonic(), 0
        with torch.no_grad():
            for batch in batches:
                model(batch["tokens"].to(device), batch["position_ids"].to(device), None)
                done += batch["tokens"].shape[0]
                if progress:
                    rate = done / max(time.monotonic() - start, 1e-9)
                    stream.write(f"calibrate: {done}/{total} sequences ({rate:.1f}/s)"
                                 f"{chr(10) if done == total else chr(13)}")
                    stream.flush()
    return loop


def quantize(model, fmt: Format, batches, *, group_size: Optional[int] = None,
             quantize: Sequence[str] = (), progress: bool = True):
    """Quantise `model` in place with modelopt (fake quantisation: weights stay in their dtype,
    quantisers hold the calibrated scales); returns it in eval mode."""
    from megatron_dsv3.export.modelopt_plugin import register

    mtq = _mtq()
    register()
    group_size = check_group_size(model, fmt, group_size, quantize)
    cfg = mtq_config(fmt, group_size, quantize)
    model.eval()
    with _quiet(not progress):
        model = mtq.quantize(model, cfg, calibration_loop(batches, progress))
    if hasattr(model, "pop_mtp_losses"):
        model.pop_mtp_losses()
    check_calibrated(model)
    if fmt.layout == "modelopt":  # (deepseek-fp8: 128x128 blocks, each with its own scale)
        fuse_shared_inputs(model)
    return model


def shared_input_linears(model) -> List[List[torch.nn.Module]]:
    """The quantised linears that read the same input and that serving engines fuse into one
    GEMM: MLA's query and KV down-projections (HF q_a_proj / q_proj and kv_a_proj_with_mqa),
    per attention layer, MTP's included. (Gate and up are one fused weight already.)"""
    groups = []
    for module in model.modules():
        kv = getattr(module, "linear_kv_down_proj", None)
        q = getattr(module, "linear_q_down_proj", None)
        q = getattr(module, "linear_q_proj", None) if q is None else q
        pair = [m for m in (q, kv) if m is not None and getattr(
            getattr(m, "weight_quantizer", None), "is_enabled", False)]
        if len(pair) == 2:
            groups.append(pair)
    return groups


def fuse_shared_inputs(model) -> None:
    """Give linears an engine fuses (shared_input_linears) the scales one fused GEMM can hold, as
    modelopt's own HF exporter does (its preprocess_linear_fusion): AWQ's pre_quant_scale
    averaged over the group, each weight rescaled by old / new scale and its weight scales
    re-calibrated; per-tensor input and weight amax the group's largest. Per-channel and block
    scales are left as they are (each output row or block keeps its own)."""
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    for group in shared_input_linears(model):
        with torch.no_grad():
            preprocess_linear_fusion(group)


def weight_quantizers(module) -> Iterable:
    """(weight name, expert index or None, quantizer) of a converted module of ours."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    q = getattr(module, "weight_quantizer", None)
    if isinstance(q, TensorQuantizer) or (q is not None and hasattr(q, "is_enabled")):
        yield "weight", None, q
    for proj in ("fc1", "fc2"):
        for e, q in enumerate(getattr(module, f"{proj}_weight_quantizers", ())):
            yield f"{proj}_weight", e, q


def check_calibrated(model) -> None:
    """Every enabled static weight quantiser has its amax: a module calibration never reached
    (e.g. an expert no calibration token was routed to keeps a weight-derived amax; a linear the
    forward loop never called would have none) is an error naming it."""
    for name, module in model.named_modules():
        for weight, e, q in weight_quantizers(module):
            if q.is_enabled and getattr(q, "amax", None) is None and not _is_dynamic(q):
                where = f"{name}.{weight}" + ("" if e is None else f"[{e}]")
                raise RuntimeError(f"{where}: its weight quantiser was not calibrated (no amax); "
                                   "the calibration forward never reached it")


def _is_dynamic(q) -> bool:
    sizes = getattr(q, "block_sizes", None)
    return isinstance(sizes, dict) and sizes.get("type") == "dynamic"
