"""A quantised model of ours (modelopt fake quantisation) as an HF DeepSeek-V3 checkpoint.

The tensor names, gate/up splits, per-expert tensors and RoPE row order are our checkpoint mapping's
(checkpoint.mapping, the same as save_hf). Each quantised weight is split into its HF tensors
together with its quantiser's calibrated amax, spread over the weight's elements (every element
carries the amax of its group: tensor, output channel, input group or 128x128 block), so every HF
tensor is quantised with exactly the scales modelopt calibrated for its rows (groups along rows -
tensor, channel, input group - survive any split). 128x128 blocks (fp8-block) are the exception:
modelopt's weight-only block calibration is the block's absolute maximum (checked), so each HF
tensor is quantised with DeepSeek's quantiser in its own blocks - the same as module-space blocks
wherever the gate/up split does not cut one (DeepSeek-V3's widths 18432 and 2048 cut none; a width
that is not a multiple of 128 would) and exactly what save_hf(fp8=True) writes.

Layouts (formats.Format.layout):
- deepseek-fp8: `weight` E4M3 + float32 `weight_scale_inv` per 128x128 block, DeepSeek's
  quantization_config (+ `modules_to_not_convert`: the linears left in high precision).
- modelopt: modelopt's unified HF layout, values made by modelopt's own `to_quantized_weight`:
  FP8 `weight` + scalar `weight_scale` + scalar `input_scale`; W8A16 int8 `weight` + per-channel
  `weight_scale`; W4A16_AWQ int4 pairs packed in uint8 `weight` [out/2, in] + `weight_scale`
  [out, in/group] + AWQ's `pre_quant_scale` [in]; `hf_quant_config.json` and a
  quantization_config with quant_method "modelopt". Scales are float32.
Everything else (embedding, norms, router, output head, and MTP unless asked) keeps the model's
dtype (the router and its bias float32, as in training).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_dsv3.checkpoint.commit import atomic_directory
from megatron_dsv3.checkpoint.errors import writing
from megatron_dsv3.checkpoint.hf_config import config_to_hf, scale_format
from megatron_dsv3.checkpoint.hf_model import is_weight_file
from megatron_dsv3.checkpoint.mapping import mirror_names, model_maps
from megatron_dsv3.checkpoint.progress import Progress
from megatron_dsv3.checkpoint.safetensors_io import SCALE_SUFFIX, ShardedSafetensorsWriter
from megatron_dsv3.export.formats import Format
from megatron_dsv3.fp8 import quant

BLOCK = 128
HF_QUANT_CONFIG = "hf_quant_config.json"


def group_amax(quantizer, weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32: each element's group amax from a calibrated weight quantiser (per
    tensor, per output channel, per input group {-1: g} or per 2-D block {-1: b, -2: b})."""
    amax = quantizer.amax
    if amax is None:
        raise ValueError("the weight quantiser holds no amax (not calibrated)")
    amax = amax.detach().float().cpu().flatten()
    o, i = weight.shape
    sizes = {k: v for k, v in (quantizer.block_sizes or {}).items() if isinstance(k, int)}
    if sizes.get(-2):
        b0, b1 = sizes[-2], sizes[-1]
        grid = amax.view(math.ceil(o / b0), math.ceil(i / b1))
        return grid.repeat_interleave(b0, 0)[:o].repeat_interleave(b1, 1)[:, :i].contiguous()
    if sizes.get(-1):
        g = sizes[-1]
        return amax.view(o, math.ceil(i / g)).repeat_interleave(g, 1)[:, :i].contiguous()
    if amax.numel() == 1:
        return amax.view(1, 1).expand(o, i).contiguous()
    if amax.numel() == o:
        return amax.view(o, 1).expand(o, i).contiguous()
    raise ValueError(f"weight quantiser amax of {amax.numel()} values fits no group layout of a "
                     f"[{o}, {i}] weight")


def _block_max(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[o, i] -> [ceil(o/rows), ceil(i/cols)] maxima (partial edge blocks included)."""
    o, i = x.shape
    padded = torch.nn.functional.pad(x, (0, (-i) % cols, 0, (-o) % rows), value=float("-inf"))
    return padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols).amax((1, 3))


class _Quantised:
    """What the writer needs of one quantised weight: its quantiser(s) and input quantiser."""

    def __init__(self, module, param: str):
        self.module, self.param = module, param
        if param == "weight":
            self.weight_quantizers = [module.weight_quantizer]
            self.input_quantizer = module.input_quantizer
        else:
            proj = param.split("_")[0]  # fc1_weight / fc2_weight of routed experts
            self.weight_quantizers = list(getattr(module, f"{proj}_weight_quantizers"))
            self.input_quantizer = getattr(module, f"{proj}_input_quantizer")

    @property
    def enabled(self) -> bool:
        return any(q.is_enabled for q in self.weight_quantizers)

    def amax_like(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 2:
            return group_amax(self.weight_quantizers[0], weight)
        return torch.stack([group_amax(q, w) for q, w in zip(self.weight_quantizers, weight)])

    def pre_quant_scale(self) -> Optional[torch.Tensor]:
        pqs = getattr(self.input_quantizer, "_pre_quant_scale", None)
        enabled = getattr(self.input_quantizer, "_enable_pre_quant_scale", True)
        return None if pqs is None or not enabled else pqs.detach().float().cpu()

    def input_amax(self) -> Optional[torch.Tensor]:
        q = self.input_quantizer
        return None if not q.is_enabled or q.amax is None else q.amax.detach().float().cpu()


def _quantised_weight(module, param: str) -> Optional[_Quantised]:
    if param == "weight" and hasattr(module, "weight_quantizer"):
        found = _Quantised(module, param)
    elif param in ("fc1_weight", "fc2_weight") and hasattr(module, "fc1_weight_quantizers"):
        found = _Quantised(module, param)
    else:
        return None
    return found if found.enabled else None


def _resolve(modules: Dict[str, torch.nn.Module], key: str):
    path, param = key.rsplit(".", 1)
    module = modules.get(path)
    if module is None or not isinstance(getattr(module, param, None), torch.Tensor):
        raise ValueError(f"model tensor {key} is not an attribute of a module of the model: the "
                         "export reads a single-process, unpipelined model")
    return module, param


def _fmt_tensors(fmt: Format, name: str, piece: torch.Tensor, amax: torch.Tensor,
                 q: _Quantised, pow2_scales: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """The HF tensors of one quantised weight piece `name` ([out, in]) in `fmt`'s layout;
    `pow2_scales`: deepseek-fp8 block scales rounded up to powers of 2 (scale_fmt ue8m0)."""
    from modelopt.torch.export.quant_utils import to_quantized_weight

    base = name[: -len("weight")]
    w = piece.detach().float().cpu()
    quantizer = q.weight_quantizers[0]
    if fmt.layout == "deepseek-fp8":
        # modelopt's weight-only 128x128 calibration (max) is each block's absolute maximum:
        # applied per HF tensor, that is DeepSeek's quantiser on it (check_block_calibration)
        if w.shape[0] > 128 and w.shape[0] % 128:  # (one partial block alone is read right)
            warnings.warn(
                f"{fmt.name}: weights with {w.shape[0]} rows (not a multiple of 128) end in a "
                "partial 128x128 block, written as DeepSeek's FP8 release writes them (e.g. its "
                "kv_a_proj_with_mqa, 576 rows) and read back exactly by megatron_dsv3; "
                "transformers 5.24's FP8 dequantisation spreads such rows evenly over the scale "
                "blocks and reads them wrongly (0.65 relative logit error measured on "
                "deepseek-v3-tiny, FFN 160)", stacklevel=2)
        qw, scale = quant.quantize_128x128(w, pow2_scales=pow2_scales)
        yield name, qw
        yield name + SCALE_SUFFIX, scale
        return
    bound = float(quantizer.maxbound)
    if fmt.quant_algo == "FP8":
        scale = (amax.max() / bound).reshape(())
        yield name, to_quantized_weight(w, scale, "fp8")
        yield base + "weight_scale", scale
        yield base + "input_scale", (q.input_amax().max() / bound).reshape(())  # (hf_plan: set)
    elif fmt.quant_algo == "W8A16":
        scale = amax[:, 0] / bound
        yield name, to_quantized_weight(w, scale, "int8_wo")
        yield base + "weight_scale", scale.contiguous()
    elif fmt.quant_algo == "W4A16_AWQ":
        group = quantizer.block_sizes[-1]
        scale = (amax[:, ::group] / bound).contiguous()
        yield name, to_quantized_weight(w, scale, "int4_awq", None, group)
        yield base + "weight_scale", scale
        pqs = q.pre_quant_scale()
        if pqs is not None:
            yield base + "pre_quant_scale", pqs.contiguous()
    else:  # (hf_plan refuses it before anything is written)
        raise ValueError(f"--quant {fmt.name}: no writer for {fmt.quant_algo}")


def _fmt_plan(fmt: Format, name: str, shape: Tuple[int, ...], q: _Quantised
              ) -> List[Tuple[str, torch.dtype, Tuple[int, ...]]]:
    """(name, dtype, shape) of what _fmt_tensors yields for a piece `name` of `shape` [out, in],
    from the format's layout rules alone (nothing quantised); the writer checks every written
    tensor against it, so a rule that disagrees with _fmt_tensors stops the export."""
    base, (o, i) = name[: -len("weight")], shape
    f32 = torch.float32  # group_amax and the input amax are float32, and so every scale
    if fmt.layout == "deepseek-fp8":
        return [(name, torch.float8_e4m3fn, shape),
                (name + SCALE_SUFFIX, f32, (math.ceil(o / BLOCK), math.ceil(i / BLOCK)))]
    if fmt.quant_algo == "FP8":
        if q.input_amax() is None:
            raise ValueError(f"{name}: FP8 needs a calibrated input quantiser (static activation "
                             "scale); it has none")
        return [(name, torch.float8_e4m3fn, shape), (base + "weight_scale", f32, ()),
                (base + "input_scale", f32, ())]
    if fmt.quant_algo == "W8A16":
        return [(name, torch.int8, shape), (base + "weight_scale", f32, (o,))]
    if fmt.quant_algo == "W4A16_AWQ":
        group = q.weight_quantizers[0].block_sizes[-1]
        if o % 2:
            raise ValueError(f"{name}: int4 packs pairs of output rows; {o} rows is odd")
        plan = [(name, torch.uint8, (o // 2, i)),
                (base + "weight_scale", f32, (o, math.ceil(i / group)))]
        if q.pre_quant_scale() is not None:
            plan.append((base + "pre_quant_scale", f32, (i,)))
        return plan
    raise ValueError(f"--quant {fmt.name}: writing its {fmt.quant_algo} tensors is not "
                     "implemented (modelopt fake-quantises it on CUDA; the packed writer is not "
                     "built without a GPU to verify it)")


def check_block_calibration(model) -> None:
    """ValueError unless every enabled 128x128 weight quantiser's amax is its block's absolute
    maximum (the fp8-block export re-derives block scales per HF tensor from the weights)."""
    for name, module in model.named_modules():
        for param in ("weight", "fc1_weight", "fc2_weight"):
            q = _quantised_weight(module, param) if hasattr(module, param) else None
            if q is None:
                continue
            weight = getattr(module, param).detach().float().cpu()
            stack = weight if weight.dim() == 3 else weight[None]
            for quantizer, w in zip(q.weight_quantizers, stack):
                own = _block_max(w.abs(), BLOCK, BLOCK)
                calibrated = _block_max(group_amax(quantizer, w), BLOCK, BLOCK)
                if not torch.allclose(own, calibrated, rtol=1e-6, atol=0):
                    raise ValueError(f"{name}.{param}: its 128x128 weight quantiser was calibrated "
                                     "to amax values other than the blocks' maxima; the fp8-block "
                                     "export takes modelopt's stock max calibration only")


def hf_tensors(model, fmt: Format, rope_interleave: bool = True, pow2_scales: bool = False
               ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor of the HF checkpoint, in writing order (quantised ones in `fmt`; deepseek-fp8
    block scales powers of 2 with `pow2_scales`)."""
    config = model.config
    modules = dict(model.named_modules())
    copies: Dict[str, List[str]] = {}
    for copy, original in mirror_names(config):
        copies.setdefault(original, []).append(copy)
    for key, m in model_maps(config, rope_interleave).items():
        module, param = _resolve(modules, key)
        with torch.no_grad():
            tensor = getattr(module, param).detach().cpu()
        q = _quantised_weight(module, param)
        if q is None:
            for name, t in m.split(tensor):  # in the model's own dtype, as save_hf writes it
                for n in (name, *copies.get(name, ())):
                    yield n, t.contiguous()
            continue
        amax = q.amax_like(tensor.float())
        for (name, piece), (_, amax_piece) in zip(m.split(tensor), m.split(amax)):
            for n, t in _fmt_tensors(fmt, name, piece, amax_piece, q, pow2_scales):
                yield n, t
                # the MTP layers' copies of a quantised head (--also-quantize head)
                for copy in copies.get(name, ()):
                    yield copy[: -len("weight")] + n[len(name) - len("weight"):], t


def hf_plan(model, fmt: Format, rope_interleave: bool = True
            ) -> List[Tuple[str, torch.dtype, Tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor hf_tensors yields, in its order, from the mapping's
    HF shapes and _fmt_plan's rules: nothing is split or quantised (the writer needs the plan
    before the first byte; quantising twice would double an export's time)."""
    config = model.config
    modules = dict(model.named_modules())
    copies: Dict[str, List[str]] = {}
    for copy, original in mirror_names(config):
        copies.setdefault(original, []).append(copy)
    plan = []
    for key, m in model_maps(config, rope_interleave).items():
        module, param = _resolve(modules, key)
        dtype = getattr(module, param).dtype
        q = _quantised_weight(module, param)
        for t in m.hf_tensors():
            if q is None:
                plan += [(n, dtype, tuple(t.shape)) for n in (t.name, *copies.get(t.name, ()))]
                continue
            for n, d, shape in _fmt_plan(fmt, t.name, tuple(t.shape), q):
                plan.append((n, d, shape))
                plan += [(copy[: -len("weight")] + n[len(t.name) - len("weight"):], d, shape)
                         for copy in copies.get(t.name, ())]
    return plan


def high_precision_linears(model, rope_interleave: bool = True, wildcards: bool = True
                           ) -> List[str]:
    """HF module names of the linear layers left unquantised (head, router, MTP unless asked);
    an MTP layer left whole is one `model.layers.N.*` pattern when `wildcards` (modelopt's
    exclude_modules), its module names otherwise (transformers' modules_to_not_convert matches
    names, not patterns)."""
    from megatron_dsv3.core.linear import _ParallelLinear
    from megatron_dsv3.moe.experts import GroupedExperts
    from megatron_dsv3.moe.router import SigmoidGroupRouter

    config = model.config
    modules = dict(model.named_modules())
    kept: Dict[str, List[str]] = {}  # HF layer prefix (or '') -> its high-precision linears
    quantised_layers = set()
    for key, m in model_maps(config, rope_interleave).items():
        module, param = _resolve(modules, key)
        # (the output head is Megatron's own ColumnParallelLinear, converted by modelopt's plugin)
        if not (isinstance(module, (_ParallelLinear, GroupedExperts, SigmoidGroupRouter))
                or hasattr(module, "weight_quantizer")):
            continue
        if param not in ("weight", "fc1_weight", "fc2_weight"):
            continue
        names = sorted({t.name.rsplit(".", 1)[0] for t in m.hf_tensors()})
        layer = ".".join(names[0].split(".")[:3]) if names[0].startswith("model.layers.") else ""
        if _quantised_weight(module, param) is None:
            kept.setdefault(layer, []).extend(n for n in names if n not in kept.get(layer, []))
        else:
            quantised_layers.add(layer)
    # each MTP layer's copy of the head (shared_head.head) is stored as the head is
    head_kept = "lm_head" in kept.get("", [])
    for copy, original in mirror_names(config):
        if original != "lm_head.weight":
            continue
        module_name = copy[: -len(".weight")]
        layer = ".".join(module_name.split(".")[:3])
        if head_kept:
            kept.setdefault(layer, []).append(module_name)
        else:
            quantised_layers.add(layer)
    out = []
    for layer, names in kept.items():
        mtp = layer and int(layer.split(".")[2]) >= config.num_layers
        # an MTP layer left whole in high precision: one wildcard, as modelopt writes it
        whole = mtp and layer not in quantised_layers and wildcards
        out += [layer + ".*"] if whole else names
    return out


def hf_config_of(model, fmt: Format, base_config, excluded: List[str], group_size,
                 rope_interleave: bool = True):
    """(config.json dict, hf_quant_config.json dict or None); `rope_interleave`: the RoPE layout
    the tensors are written in (the source's), which config.json must say."""
    config = model.config
    if fmt.layout == "deepseek-fp8":
        hf = config_to_hf(config, base_config, fp8=True, rope_interleave=rope_interleave)
        hf["quantization_config"]["modules_to_not_convert"] = excluded
        return hf, None
    import modelopt
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    quantization = {"quant_algo": fmt.quant_algo, "exclude_modules": excluded}
    if group_size:
        quantization["group_size"] = group_size
    hf_quant = {"producer": {"name": "modelopt", "version": modelopt.__version__},
                "quantization": quantization}
    hf = config_to_hf(config, base_config, fp8=False, rope_interleave=rope_interleave)
    converted = convert_hf_quant_config_format(hf_quant)
    converted.setdefault("quant_method", "modelopt")
    converted.setdefault("quant_algo", fmt.quant_algo)
    if group_size:  # (modelopt 0.47's conversion keeps it for NVFP4 only)
        converted.setdefault("group_size", group_size)
    hf["quantization_config"] = converted
    return hf, hf_quant


def export_hf(model, path: str, fmt: Format, *, base_config=None, group_size=None,
              max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
              progress: bool = False, extra_files: Sequence[str] = ()) -> None:
    """Write the quantised `model` as an HF checkpoint at `path` (atomically: a failure leaves
    any previous checkpoint there untouched). `extra_files` (e.g. the source's tokenizer files)
    are copied in before the checkpoint is published, so they are there whenever it is."""
    rope_interleave = (base_config or {}).get("rope_interleave", True)
    pow2_scales = scale_format(base_config) == "ue8m0"  # (config_to_hf writes the same scale_fmt)
    if fmt.layout == "deepseek-fp8":
        check_block_calibration(model)
    plan = hf_plan(model, fmt, rope_interleave)
    total = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in plan)
    bar = Progress(f"export {fmt.name}", total, enabled=progress)
    excluded = high_precision_linears(model, rope_interleave,
                                      wildcards=fmt.layout != "deepseek-fp8")
    hf, hf_quant = hf_config_of(model, fmt, base_config, excluded, group_size, rope_interleave)
    with atomic_directory(path, overwrite, covers=is_weight_file) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes)
        try:
            for name, tensor in hf_tensors(model, fmt, rope_interleave, pow2_scales):
                writer.write(name, tensor.contiguous())
                bar.update(tensor.numel() * tensor.element_size())
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        for file, content in (("config.json", hf), (HF_QUANT_CONFIG, hf_quant)):
            if content is not None:
                with writing(os.path.join(tmp, file)) as target, open(target, "w") as f:
                    json.dump(content, f, indent=2)
        for source in extra_files:
            with writing(os.path.join(tmp, os.path.basename(source))) as target:
                shutil.copy2(source, target)
    bar.close()
