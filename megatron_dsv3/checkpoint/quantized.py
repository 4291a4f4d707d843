"""Reading modelopt-quantised HF checkpoints (quant_method "modelopt") back into our model.

`open_hf_reader(path, hf_config)` is the HFReader of every load path: for a checkpoint whose config.json says
quant_method "modelopt" it returns a `ModeloptReader`, which shows the loader each quantised
weight under its own name and logical shape and dequantises it on read (pure torch, no modelopt):

    FP8        weight (E4M3) * weight_scale (scalar or per output channel)
    W8A16      weight (int8) * weight_scale [out]
    W4A16_AWQ  int4 pairs packed in uint8 [out/2, in] (row 2j low nibble, 2j+1 high; two's
               complement) * weight_scale [out, in/group], then * pre_quant_scale [in] per input
               column (the quantised layer computes (x * pqs) @ W^T: the same as x @ (W * pqs)^T)

Scales must be finite and > 0. `input_scale` (a static activation scale) has no place in a
dense model and is read over; other algorithms (NVFP4, ...) are refused naming the allowed ones.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_dsv3.checkpoint.errors import CheckpointFileError
from megatron_dsv3.checkpoint.mapping import Region, full_region
from megatron_dsv3.checkpoint.safetensors_io import HFReader

READABLE_ALGOS = ("FP8", "W8A16", "W4A16_AWQ")
AUX_SUFFIXES = ("weight_scale", "input_scale", "pre_quant_scale")


def modelopt_algo(hf_config: Dict) -> Optional[str]:
    """quant_algo of a modelopt-quantised HF config, None for any other config."""
    quant = hf_config.get("quantization_config") or {}
    if quant.get("quant_method") != "modelopt":
        return None
    return quant.get("quant_algo")


def check_readable(hf_config: Dict) -> None:
    algo = modelopt_algo(hf_config)
    if algo is not None and algo not in READABLE_ALGOS:
        raise ValueError(f"quantization_config.quant_algo={algo!r}: our loader dequantises "
                         f"{list(READABLE_ALGOS)} (serve {algo} with TensorRT-LLM, vLLM or SGLang)")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in] -> int8 [out, in]: rows 2j (low nibble) and 2j+1 (high nibble)."""
    p = packed.view(torch.uint8).to(torch.int16)
    low, high = p & 0x0F, (p >> 4) & 0x0F
    both = torch.stack([low, high], dim=1)  # [out/2, 2, in]
    both = torch.where(both >= 8, both - 16, both)
    return both.reshape(-1, packed.shape[-1]).to(torch.int8)


# storage dtypes of modelopt's quantised weights (FP8 codes, int8, packed int4)
QUANTISED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8)


class ModeloptReader(HFReader):
    def __init__(self, path: str, algo: str, group_size: Optional[int]):
        super().__init__(path)
        self.algo, self.group_size = algo, group_size

    def _aux(self, name: str, suffix: str) -> str:
        return name[: -len("weight")] + suffix

    def quantised(self, name: str) -> bool:
        return name.endswith("weight") and self.has(self._aux(name, "weight_scale"))

    def names(self) -> List[str]:
        return [n for n in super().names()
                if not any(n.endswith("." + s) or n == s for s in AUX_SUFFIXES)]

    def shape(self, name: str) -> Tuple[int, ...]:
        stored = super().shape(name)
        if self.algo == "W4A16_AWQ" and self.quantised(name):
            return (stored[0] * 2, *stored[1:])
        return stored

    def is_fp8(self, name: str) -> bool:
        return False

    def check(self, name: str, shape: Sequence[int]) -> None:
        self._check_shape(name, shape)
        if self.quantised(name):
            self._scales(name)  # present, finite, > 0, fitting shapes
        else:
            self._refuse_codes_without_scale(name)

    def _refuse_codes_without_scale(self, name: str) -> None:
        """A weight stored as quantised codes whose weight_scale is missing (dropped from the
        index or its shard): read would hand back the raw codes as the weight."""
        if self.dtype(name) in QUANTISED_DTYPES:
            raise CheckpointFileError(
                self.file_of(name), f"is stored as {self.dtype(name)} but the checkpoint has no "
                f"{self._aux(name, 'weight_scale')}: without it the weight cannot be dequantised",
                name)

    def _scales(self, name: str):
        """(weight_scale, pre_quant_scale or None) of quantised weight `name`, float32; checked
        the first time they are read (check, or read without check)."""
        scale = self._slice(self._aux(name, "weight_scale"),
                            full_region(super().shape(self._aux(name, "weight_scale")))).float()
        pqs = None
        if self.has(self._aux(name, "pre_quant_scale")):
            pqs = self._slice(self._aux(name, "pre_quant_scale"), None).float()
        if name not in self._scales_checked:
            self._check_scales(name, scale, pqs)
            self._scales_checked.add(name)
        return scale, pqs

    def _check_scales(self, name: str, scale: torch.Tensor, pqs: Optional[torch.Tensor]) -> None:
        out, cols = self.shape(name)
        fits = {"FP8": scale.numel() in (1, out), "W8A16": scale.numel() == out,
                "W4A16_AWQ": scale.dim() == 2 and scale.shape[0] == out
                and self.group_size is not None and scale.shape[1] * self.group_size == cols}
        file = self.file_of(self._aux(name, "weight_scale"))
        if not fits[self.algo]:
            raise CheckpointFileError(file, f"has shape {list(scale.shape)}, which does not fit a "
                                      f"{[out, cols]} {self.algo} weight", self._aux(name, "weight_scale"))
        if pqs is not None and pqs.shape != (cols,):
            raise CheckpointFileError(self.file_of(self._aux(name, "pre_quant_scale")),
                                      f"has shape {list(pqs.shape)}; expected [{cols}]",
                                      self._aux(name, "pre_quant_scale"))
        for label, values in (("weight_scale", scale), ("pre_quant_scale", pqs)):
            if values is not None and not bool((torch.isfinite(values) & (values > 0)).all()):
                raise CheckpointFileError(self.file_of(self._aux(name, label)),
                                          "holds scales that are not finite and > 0",
                                          self._aux(name, label))

    def read(self, name: str, region: Optional[Region] = None) -> torch.Tensor:
        if not self.quantised(name):
            self._refuse_codes_without_scale(name)
            return super().read(name, region)
        shape = self.shape(name)
        scale, pqs = self._scales(name)
        stored = self._slice(name, full_region(super().shape(name)))
        if self.algo == "W4A16_AWQ":
            w = unpack_int4(stored).float() * scale.repeat_interleave(self.group_size, 1)
        elif scale.numel() == 1:
            w = stored.float() * scale.reshape(())
        else:
            w = stored.float() * scale.reshape(-1, 1)
        if pqs is not None:
            w = w * pqs
        region = full_region(shape) if region is None else tuple(region)
        return w[region]


def open_hf_reader(path: str, hf_config: Dict) -> HFReader:
    """The reader for the HF checkpoint at `path` whose config.json the caller has read
    (`hf_config`): dequantising a modelopt export, else HFReader."""
    algo = modelopt_algo(hf_config)
    if algo is None:
        return HFReader(path)
    check_readable(hf_config)
    quant = hf_config["quantization_config"]
    group = quant.get("group_size")
    for g in (quant.get("config_groups") or {}).values():
        group = group or (g.get("weights") or {}).get("group_size")
    if algo == "W4A16_AWQ" and not isinstance(group, int):
        raise ValueError(f"{os.path.join(path, 'config.json')}: quantization_config of a W4A16_AWQ "
                         "checkpoint gives no integer group_size (the weight_scale columns cannot "
                         "be placed)")
    return ModeloptReader(path, algo, group)
