"""Which HF tensors make each of our model's tensors (pure: names, shapes and index arithmetic).

Our tensors are named by their *sharded* (global) key, the name Megatron's distributed checkpoint
uses whatever the parallel layout: `decoder.layers.{i}.…` with the global layer number and
`mtp.layers.{k}.…` for MTP depth k+1. Each is built from HF tensors in one of four ways:

    Direct    ours = hf                                   (norms, projections, router, embedding)
    Direct    ours = hf[perm] (rows)                      (RoPE rows of an rope_interleave=False
                                                           checkpoint, turned into interleaved pairs)
    Stacked   ours = [gate; up]                           (SwiGLU fc1)
    Experts   ours[e] = expert e's tensor                 (stacked routed experts [E, ...])

A map can read any rectangular region of our tensor from the HF tensors it needs (a tensor-parallel
slice, a range of experts) and split a full tensor (or a range of experts) back into HF tensors.
DeepSeek's FP8 release quantises the linear weights of attention and of the dense, shared and routed
experts' MLPs (`fp8=True` below); norms, embedding, output head, router, router bias and the MTP
projection eh_proj stay in higher precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

Region = Tuple[slice, ...]


class HFSource(Protocol):
    def read(self, name: str, region: Region) -> torch.Tensor: ...

    def has(self, name: str) -> bool: ...


def full_region(shape: Sequence[int]) -> Region:
    return tuple(slice(0, n) for n in shape)


def _bounds(s: slice, n: int) -> Tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"region slices must be contiguous, got step {step}")
    return start, max(start, stop)


@dataclass
class HFTensor:
    name: str
    shape: Tuple[int, ...]
    fp8: bool = False  # quantised to E4M3 128x128 blocks in DeepSeek's release


class TensorMap:
    key: str
    shape: Tuple[int, ...]
    # float32 for the router and the norms (whatever dtype a model keeps them in, a float32
    # copy loads into it exactly as the HF tensor would); None: the model's dtype
    dtype_override: Optional[torch.dtype] = None
    tp_split: Optional[str] = None  # how a tensor-parallel layout splits it: 'column', 'row', 'glu'

    def hf_tensors(self) -> List[HFTensor]:
        raise NotImplementedError

    def read(self, src: HFSource, region: Region) -> torch.Tensor:
        raise NotImplementedError

    def split(self, tensor: torch.Tensor, start: int = 0) -> List[Tuple[str, torch.Tensor]]:
        """HF tensors of our full tensor (for Experts: experts start.. of a leading range)."""
        raise NotImplementedError


@dataclass
class Direct(TensorMap):
    key: str
    hf: HFTensor
    perm: Optional[torch.Tensor] = None  # our row i = hf row perm[i]
    mirrors: Tuple[str, ...] = ()  # HF copies that must hold the same values (MTP's shared copies)
    dtype_override: Optional[torch.dtype] = None
    tp_split: Optional[str] = None

    @property
    def shape(self):
        return self.hf.shape

    def hf_tensors(self):
        return [self.hf]

    def read(self, src, region):
        if self.perm is None:
            out = src.read(self.hf.name, region)
        else:
            rows = self.perm[slice(*_bounds(region[0], self.shape[0]))]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            out = src.read(self.hf.name, (slice(lo, hi), *region[1:]))[rows - lo]
        for name in self.mirrors:
            if src.has(name):
                copy = src.read(name, region)
                if not torch.equal(copy, out):
                    diff = (copy.float() - out.float()).abs().max().item()
                    raise ValueError(
                        f"{name} differs from {self.hf.name} (max abs difference {diff:g}): the MTP "
                        "module shares the main model's embedding and output head, so the copies "
                        "in the checkpoint must be equal")
        return out

    def split(self, tensor, start=0):
        if self.perm is not None:
            tensor = tensor[torch.argsort(self.perm)]
        return [(self.hf.name, tensor)]


@dataclass
class Stacked(TensorMap):
    """ours = cat(parts, dim 0)."""

    key: str
    parts: List[HFTensor]
    tp_split: Optional[str] = "glu"
    dtype_override: Optional[torch.dtype] = None

    @property
    def shape(self):
        rows = sum(p.shape[0] for p in self.parts)
        return (rows, *self.parts[0].shape[1:])

    def hf_tensors(self):
        return list(self.parts)

    def read(self, src, region):
        a, b = _bounds(region[0], self.shape[0])
        pieces, offset = [], 0
        for part in self.parts:
            lo, hi = max(a, offset), min(b, offset + part.shape[0])
            if lo < hi:
                pieces.append(src.read(part.name, (slice(lo - offset, hi - offset), *region[1:])))
            offset += part.shape[0]
        return torch.cat(pieces, dim=0)

    def split(self, tensor, start=0):
        sizes = [p.shape[0] for p in self.parts]
        return [(p.name, t) for p, t in zip(self.parts, torch.split(tensor, sizes, dim=0))]


@dataclass
class Experts(TensorMap):
    """ours[e] = expert e's 2-D tensor, e in [0, E)."""

    key: str
    num_experts: int
    expert: Callable[[int], TensorMap]
    tp_split: Optional[str] = None  # experts are split by expert parallelism only
    dtype_override: Optional[torch.dtype] = None

    @property
    def shape(self):
        return (self.num_experts, *self.expert(0).shape)

    def hf_tensors(self):
        return [t for e in range(self.num_experts) for t in self.expert(e).hf_tensors()]

    def read(self, src, region):
        e0, e1 = _bounds(region[0], self.num_experts)
        return torch.stack([self.expert(e).read(src, region[1:]) for e in range(e0, e1)])

    def split(self, tensor, start=0):
        return [pair for i in range(tensor.shape[0])
                for pair in self.expert(start + i).split(tensor[i])]


def rope_rows_perm(num_blocks: int, block: int, offset: int, rope_dim: int) -> torch.Tensor:
    """Row permutation that turns rotate-half RoPE rows into interleaved pairs.

    Each of `num_blocks` blocks of `block` rows holds `rope_dim` RoPE rows starting at `offset`.
    HF's rope_interleave=False rotates (x_i, x_{i+d/2}) by frequency i; our MLA rotates
    (x_{2i}, x_{2i+1}). So our row offset+2i is HF row offset+i and our row offset+2i+1 is HF row
    offset+d/2+i; q.k is unchanged because queries and keys are permuted alike.
    """
    half = rope_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    perm = torch.arange(num_blocks * block)
    for j in range(num_blocks):
        base = j * block + offset
        perm[base:base + rope_dim] = base + within
    return perm


def _swiglu(key: str, hf_prefix: str, ffn: int, h: int, fp8: bool = True, **kw) -> Stacked:
    return Stacked(key, [HFTensor(f"{hf_prefix}gate_proj.weight", (ffn, h), fp8),
                         HFTensor(f"{hf_prefix}up_proj.weight", (ffn, h), fp8)], **kw)


def layer_maps(config, ours: str, hf: str, layer_number: int,
               rope_interleave: bool = True) -> List[TensorMap]:
    """Maps of one decoder layer: our prefix `ours` (ending in '.'), HF prefix `hf`, global
    1-based `layer_number` (decides dense or MoE)."""
    from megatron_dsv3.configs import is_moe_layer

    h, nh = config.hidden_size, config.num_attention_heads
    dn, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    qr, kr = config.q_lora_rank, config.kv_lora_rank
    a, att = f"{ours}self_attention.", f"{hf}self_attn."
    q_perm = None if rope_interleave else rope_rows_perm(nh, dn + dr, dn, dr)
    kv_perm = None if rope_interleave else rope_rows_perm(1, kr + dr, kr, dr)

    def direct(key, name, shape, fp8=False, **kw):
        if len(shape) == 1:
            kw.setdefault("dtype_override", torch.float32)
        return Direct(key, HFTensor(name, tuple(shape), fp8), **kw)

    maps: List[TensorMap] = [direct(f"{ours}input_layernorm.weight", f"{hf}input_layernorm.weight", (h,))]
    if qr is None:
        maps.append(direct(f"{a}linear_q_proj.weight", f"{att}q_proj.weight", (nh * (dn + dr), h),
                           True, perm=q_perm, tp_split="column"))
    else:
        maps += [direct(f"{a}linear_q_down_proj.weight", f"{att}q_a_proj.weight", (qr, h), True),
                 direct(f"{a}q_layernorm.weight", f"{att}q_a_layernorm.weight", (qr,)),
                 direct(f"{a}linear_q_up_proj.weight", f"{att}q_b_proj.weight", (nh * (dn + dr), qr),
                        True, perm=q_perm, tp_split="column")]
    maps += [
        direct(f"{a}linear_kv_down_proj.weight", f"{att}kv_a_proj_with_mqa.weight", (kr + dr, h),
               True, perm=kv_perm),
        direct(f"{a}kv_layernorm.weight", f"{att}kv_a_layernorm.weight", (kr,)),
        direct(f"{a}linear_kv_up_proj.weight", f"{att}kv_b_proj.weight", (nh * (dn + dv), kr), True,
               tp_split="column"),
        direct(f"{a}linear_proj.weight", f"{att}o_proj.weight", (h, nh * dv), True, tp_split="row"),
        direct(f"{ours}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight", (h,)),
    ]
    m, mh = f"{ours}mlp.", f"{hf}mlp."
    if not is_moe_layer(config, layer_number):
        ffn = config.ffn_hidden_size
        return maps + [_swiglu(f"{m}linear_fc1.weight", mh, ffn, h),
                       direct(f"{m}linear_fc2.weight", f"{mh}down_proj.weight", (h, ffn), True,
                              tp_split="row")]
    E, F = config.num_moe_experts, config.moe_ffn_hidden_size
    maps += [
        direct(f"{m}router.weight", f"{mh}gate.weight", (E, h), dtype_override=torch.float32),
        direct(f"{m}router.expert_bias", f"{mh}gate.e_score_correction_bias", (E,),
               dtype_override=torch.float32),
        Experts(f"{m}experts.fc1_weight", E,
                lambda e: _swiglu("", f"{mh}experts.{e}.", F, h, tp_split=None)),
        Experts(f"{m}experts.fc2_weight", E,
                lambda e: direct("", f"{mh}experts.{e}.down_proj.weight", (h, F), True)),
    ]
    shared = config.moe_shared_expert_intermediate_size
    if shared:
        maps += [_swiglu(f"{m}shared_experts.linear_fc1.weight", f"{mh}shared_experts.", shared, h),
                 direct(f"{m}shared_experts.linear_fc2.weight", f"{mh}shared_experts.down_proj.weight",
                        (h, shared), True, tp_split="row")]
    return maps


def model_maps(config, rope_interleave: bool = True) -> Dict[str, TensorMap]:
    """Every tensor of the whole model (all pipeline stages), by sharded key, in checkpoint order."""
    h, V, L = config.hidden_size, config.vocab_size, config.num_layers
    depth = config.mtp_num_layers or 0
    embed_copies = tuple(f"model.layers.{L + k}.embed_tokens.weight" for k in range(depth))
    head_copies = tuple(f"model.layers.{L + k}.shared_head.head.weight" for k in range(depth))
    maps: List[TensorMap] = [Direct("embedding.word_embeddings.weight",
                                    HFTensor("model.embed_tokens.weight", (V, h)),
                                    mirrors=embed_copies, tp_split="column")]
    for i in range(L):
        maps += layer_maps(config, f"decoder.layers.{i}.", f"model.layers.{i}.", i + 1,
                           rope_interleave)
    norm = dict(dtype_override=torch.float32)
    maps += [Direct("decoder.final_layernorm.weight", HFTensor("model.norm.weight", (h,)), **norm),
             Direct("output_layer.weight", HFTensor("lm_head.weight", (V, h)), mirrors=head_copies,
                    tp_split="column")]
    for k in range(depth):
        ours, hf = f"mtp.layers.{k}.", f"model.layers.{L + k}."
        maps += [Direct(f"{ours}enorm.weight", HFTensor(f"{hf}enorm.weight", (h,)), **norm),
                 Direct(f"{ours}hnorm.weight", HFTensor(f"{hf}hnorm.weight", (h,)), **norm),
                 Direct(f"{ours}eh_proj.weight", HFTensor(f"{hf}eh_proj.weight", (h, 2 * h)),
                        tp_split="column")]
        maps += layer_maps(config, f"{ours}transformer_layer.", hf, L + k + 1, rope_interleave)
        maps.append(Direct(f"{ours}final_layernorm.weight",
                           HFTensor(f"{hf}shared_head.norm.weight", (h,)), **norm))
    return {m.key: m for m in maps}


def mirror_names(config) -> List[Tuple[str, str]]:
    """(copy, original) pairs DeepSeek writes for each MTP depth: the shared embedding and head."""
    L = config.num_layers
    pairs = []
    for k in range(config.mtp_num_layers or 0):
        pairs += [(f"model.layers.{L + k}.embed_tokens.weight", "model.embed_tokens.weight"),
                  (f"model.layers.{L + k}.shared_head.head.weight", "lm_head.weight")]
    return pairs


def tp_chunks(tmap: TensorMap, tp: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """(offset, shape) of the pieces a tensor-parallel layout of size `tp` holds of this tensor
    (each routed expert is its own piece, which covers every expert-parallel layout)."""
    shape = tmap.shape
    if isinstance(tmap, Experts):
        return [((e,) + (0,) * (len(shape) - 1), (1, *shape[1:])) for e in range(shape[0])]
    if tmap.tp_split is None or tp == 1 and tmap.tp_split != "glu":
        return [((0,) * len(shape), tuple(shape))]
    if tmap.tp_split == "glu":
        half = shape[0] // 2
        n = half // tp
        return [((p * half + r * n, 0), (n, shape[1])) for p in range(2) for r in range(tp)]
    dim = 0 if tmap.tp_split == "column" else 1
    n = shape[dim] // tp
    out = []
    for r in range(tp):
        offset, size = [0] * len(shape), list(shape)
        offset[dim], size[dim] = r * n, n
        out.append((tuple(offset), tuple(size)))
    return out
