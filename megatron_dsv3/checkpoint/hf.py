"""DeepSeek-V3 HF checkpoints <-> megatron-dsv3 models.

Layout (deepseek-ai/DeepSeek-V3, HF transformers' DeepseekV3ForCausalLM): `model.layers.{i}`
for decoder layer i (0-based), the MTP modules after the last decoder layer
(`model.layers.{num_layers + k}`: enorm, hnorm, eh_proj, a full layer, shared_head.norm; their
embed_tokens / shared_head.head are copies of the shared ones), per-expert
`mlp.experts.{e}.{gate,up,down}_proj`, the router bias `mlp.gate.e_score_correction_bias`.
FP8 checkpoints store linear weights as float8_e4m3fn with `weight_scale_inv` per 128x128 block
(dequantised = block * scale_inv).

`load_hf` reads lazily (safetensors safe_open, only the tensors this rank needs, one at a time)
and fills whatever tensor-, pipeline- and expert-parallel slice the model holds. `save_hf` writes
shards incrementally into a temporary directory and renames it into place at the end, so an
interrupted save leaves the previous checkpoint untouched. RoPE: our MLA rotates interleaved pairs
(HF rope_interleave=True); checkpoints with rope_interleave=False get their RoPE rows permuted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_dsv3.fp8.quant import dequantize_128x128, quantize_128x128

INDEX = "model.safetensors.index.json"


# -- configs ---------------------------------------------------------------------------------
def _read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def config_from_hf(path_or_dict, **overrides):
    """HF config.json (a directory, a file, or a dict) -> DeepSeekV3Config."""
    from megatron_dsv3.configs import get_config

    if isinstance(path_or_dict, dict):
        hf = path_or_dict
    else:
        path = path_or_dict
        hf = _read_json(os.path.join(path, "config.json") if os.path.isdir(path) else path)
    defaults = {"hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc"}
    for field, allowed in (("hidden_act", ("silu",)), ("scoring_func", ("sigmoid",)),
                           ("topk_method", ("noaux_tc", "greedy", "group_limited_greedy"))):
        if hf.get(field, defaults[field]) not in allowed:
            raise ValueError(f"HF config field {field}={hf.get(field)!r} cannot be held by this "
                             f"model: allowed values are {[a for a in allowed if a]}")
    if hf.get("tie_word_embeddings"):
        raise ValueError("HF config field tie_word_embeddings=True cannot be held: DeepSeek-V3 "
                         "unties embedding and output head (allowed value: False)")
    if hf.get("norm_topk_prob") is False and hf.get("num_experts_per_tok", 1) > 1:
        raise ValueError("HF config field norm_topk_prob=False is not supported: allowed value "
                         "True (DeepSeek-V3 normalises the top-k sigmoid weights)")
    layers = hf["num_hidden_layers"]
    experts = hf.get("n_routed_experts")
    freq = hf.get("moe_layer_freq", 1)
    first_dense = hf.get("first_k_dense_replace", 0)
    pattern = [1 if experts and i >= first_dense and i % freq == 0 else 0 for i in range(layers)]
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"HF config rope_type={rope_type!r} cannot be held: allowed values are "
                         "'default', 'yarn'")
    values = dict(
        num_layers=layers, hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"], qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6), vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=theta, moe_layer_freq=pattern,
        mtp_num_layers=hf.get("num_nextn_predict_layers") or None,
        init_method_std=hf.get("initializer_range", 0.02))
    if experts:
        values.update(num_moe_experts=experts, moe_ffn_hidden_size=hf["moe_intermediate_size"],
                      moe_shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0)
                      * hf["moe_intermediate_size"] or None,
                      moe_router_topk=hf["num_experts_per_tok"],
                      moe_router_num_groups=hf.get("n_group") or 1,
                      moe_router_group_topk=hf.get("topk_group") or hf.get("n_group") or 1,
                      moe_router_topk_scaling_factor=hf.get("routed_scaling_factor", 1.0))
    else:
        values.update(num_moe_experts=None)
    if rope_type == "yarn":
        factor = rope.get("factor") or values["max_position_embeddings"] / rope[
            "original_max_position_embeddings"]
        values.update(rope_type="yarn", rotary_scaling_factor=factor,
                      original_max_position_embeddings=rope["original_max_position_embeddings"],
                      beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                      mscale=rope.get("mscale") or 0.0, mscale_all_dim=rope.get("mscale_all_dim") or 0.0)
    else:
        values.update(rope_type="rope")
    values.update(overrides)
    cfg = get_config("deepseek-v3-tiny", **values)
    object.__setattr__(cfg, "hf_rope_interleave", hf.get("rope_interleave", True))
    return cfg


def hf_config_dict(config) -> Dict:
    """Our config -> HF DeepseekV3 config.json fields."""
    freq = config.moe_layer_freq
    pattern = list(freq) if isinstance(freq, (list, tuple)) else [
        1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    experts = config.num_moe_experts
    first_dense = pattern.index(1) if experts and 1 in pattern else config.num_layers
    if experts and pattern != [0] * first_dense + [1] * (config.num_layers - first_dense):
        raise ValueError(f"moe_layer_freq={list(freq)} cannot be written as HF's "
                         "first_k_dense_replace: allowed are k dense layers followed by MoE layers")
    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
           "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
           "num_attention_heads": config.num_attention_heads,
           "num_key_value_heads": config.num_attention_heads, "q_lora_rank": config.q_lora_rank,
           "kv_lora_rank": config.kv_lora_rank, "qk_nope_head_dim": config.qk_head_dim,
           "qk_rope_head_dim": config.qk_pos_emb_head_dim, "v_head_dim": config.v_head_dim,
           "rms_norm_eps": config.layernorm_epsilon, "hidden_act": "silu",
           "max_position_embeddings": config.max_position_embeddings,
           "num_nextn_predict_layers": config.mtp_num_layers or 0, "tie_word_embeddings": False,
           "rope_interleave": True, "initializer_range": config.init_method_std,
           "first_k_dense_replace": first_dense, "moe_layer_freq": 1, "torch_dtype": "bfloat16"}
    if experts:
        out.update(n_routed_experts=experts, moe_intermediate_size=config.moe_ffn_hidden_size,
                   n_shared_experts=(config.moe_shared_expert_intermediate_size or 0)
                   // config.moe_ffn_hidden_size,
                   num_experts_per_tok=config.moe_router_topk,
                   n_group=config.moe_router_num_groups or 1,
                   topk_group=config.moe_router_group_topk or config.moe_router_num_groups or 1,
                   routed_scaling_factor=config.moe_router_topk_scaling_factor or 1.0,
                   norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc")
    else:
        out.update(n_routed_experts=None, moe_intermediate_size=config.ffn_hidden_size)
    if config.rope_type == "yarn":
        out["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": config.rotary_base,
            "factor": config.rotary_scaling_factor,
            "original_max_position_embeddings": config.original_max_position_embeddings,
            "beta_fast": config.beta_fast, "beta_slow": config.beta_slow,
            "mscale": config.mscale, "mscale_all_dim": config.mscale_all_dim}
    else:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rotary_base}
    return out


# -- reading ------------------------------------------------------------------------------------
class HFReader:
    """Lazy access to an HF checkpoint directory: tensors are read one at a time."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path, self._open, self._handles = path, safe_open, {}
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            self.where = _read_json(index)["weight_map"]
        else:
            files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
            if not files:
                raise FileNotFoundError(f"{path}: no {INDEX} and no *.safetensors file")
            self.where = {}
            for f in files:
                with safe_open(os.path.join(path, f), "pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self.used: set = set()

    def _handle(self, file: str):
        if file not in self._handles:
            full = os.path.join(self.path, file)
            if not os.path.exists(full):
                raise FileNotFoundError(f"shard {file} (listed in {INDEX}) is missing from "
                                        f"{self.path}")
            self._handles[file] = self._open(full, "pt")
        return self._handles[file]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, dtype=torch.float32) -> torch.Tensor:
        """The tensor `key`, dequantised from FP8 blocks when it has a weight_scale_inv."""
        if key not in self.where:
            raise KeyError(f"tensor {key} is not in the checkpoint {self.path}")
        file = self.where[key]
        t = self._handle(file).get_tensor(key)
        self.used.add(key)
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith("weight") else None
        if scale_key and scale_key in self.where:
            scale = self._handle(self.where[scale_key]).get_tensor(scale_key)
            self.used.add(scale_key)
            if t.dim() != 2:
                raise ValueError(f"{key} in {file} has a weight_scale_inv but is not a 2-D weight")
            expected = (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            if tuple(scale.shape) != expected:
                raise ValueError(f"{scale_key} in {self.where[scale_key]} has shape "
                                 f"{tuple(scale.shape)}; a {tuple(t.shape)} weight in 128x128 "
                                 f"blocks needs {expected}")
            return dequantize_128x128(t, scale, dtype=dtype)
        if t.dtype == torch.float8_e4m3fn:
            raise ValueError(f"{key} in {file} is FP8 but has no {scale_key}: its values cannot "
                             "be dequantised")
        return t.to(dtype)

    def file_of(self, key: str) -> str:
        return self.where.get(key, "<not in any shard>")

    def close(self):
        self._handles.clear()


# -- the mapping ----------------------------------------------------------------------------
def _rope_perm(dr: int) -> torch.Tensor:
    """Our interleaved pair (2i, 2i+1) <- HF half-split dims (i, i + dr/2)."""
    return torch.stack([torch.arange(dr // 2), torch.arange(dr // 2) + dr // 2], 1).flatten()


def _tp(model) -> Tuple[int, int]:
    group = getattr(model.pg_collection, "tp", None)
    return (group.size(), group.rank()) if group is not None else (1, 0)


def _slice(t: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n)


class _Rules:
    """For each of our parameters: (HF keys, full tensor -> this rank's value) and back."""

    def __init__(self, model, interleaved: bool = True):
        self.model, self.config = model, model.config
        self.tp, self.tp_rank = _tp(model)
        self.interleaved = interleaved

    def _q_rows(self, w: torch.Tensor, inverse=False) -> torch.Tensor:
        """Permute the RoPE rows of each head of q_b_proj / q_proj (non-interleaved layout)."""
        if self.interleaved:
            return w
        c = self.config
        dn, dr = c.qk_head_dim, c.qk_pos_emb_head_dim
        perm = _rope_perm(dr)
        if inverse:
            perm = torch.argsort(perm)
        w = w.view(c.num_attention_heads, dn + dr, -1).clone()
        w[:, dn:] = w[:, dn:][:, perm]
        return w.view(-1, w.shape[-1])

    def _kv_rows(self, w: torch.Tensor, inverse=False) -> torch.Tensor:
        if self.interleaved:
            return w
        dr = self.config.qk_pos_emb_head_dim
        perm = _rope_perm(dr)
        if inverse:
            perm = torch.argsort(perm)
        w = w.clone()
        w[-dr:] = w[-dr:][perm]
        return w

    def layer(self, prefix: str, name: str, module_of: Callable[[str], object]):
        """(keys, load(get) -> tensor for this rank, save(value) -> {key: full tensor}) for our
        layer parameter `name` (relative to the layer) under HF prefix `prefix`."""
        tp, r = self.tp, self.tp_rank
        A = f"{prefix}.self_attn."
        M = f"{prefix}.mlp."
        col = lambda key: ([key], lambda g: _slice(g(key), 0, tp, r), lambda v: {key: v})  # noqa
        row = lambda key: ([key], lambda g: _slice(g(key), 1, tp, r), lambda v: {key: v})  # noqa
        same = lambda key: ([key], lambda g: g(key), lambda v: {key: v})  # noqa

        def glu(gate, up):
            def load(g):
                return torch.cat([_slice(g(gate), 0, tp, r), _slice(g(up), 0, tp, r)])

            def save(v):
                half = v.shape[0] // 2
                return {gate: v[:half], up: v[half:]}
            return [gate, up], load, save

        simple = {
            "input_layernorm.weight": same(f"{prefix}.input_layernorm.weight"),
            "pre_mlp_layernorm.weight": same(f"{prefix}.post_attention_layernorm.weight"),
            "self_attention.linear_q_down_proj.weight": same(A + "q_a_proj.weight"),
            "self_attention.q_layernorm.weight": same(A + "q_a_layernorm.weight"),
            "self_attention.kv_layernorm.weight": same(A + "kv_a_layernorm.weight"),
            "self_attention.linear_kv_up_proj.weight": col(A + "kv_b_proj.weight"),
            "self_attention.linear_proj.weight": row(A + "o_proj.weight"),
            "mlp.linear_fc1.weight": glu(M + "gate_proj.weight", M + "up_proj.weight"),
            "mlp.linear_fc2.weight": row(M + "down_proj.weight"),
            "mlp.router.weight": same(M + "gate.weight"),
            "mlp.router.expert_bias": same(M + "gate.e_score_correction_bias"),
            "mlp.shared_experts.linear_fc1.weight": glu(M + "shared_experts.gate_proj.weight",
                                                        M + "shared_experts.up_proj.weight"),
            "mlp.shared_experts.linear_fc2.weight": row(M + "shared_experts.down_proj.weight"),
        }
        if name in simple:
            return simple[name]
        for ours, key, rows in (("self_attention.linear_q_up_proj.weight", "q_b_proj.weight", self._q_rows),
                                ("self_attention.linear_q_proj.weight", "q_proj.weight", self._q_rows),
                                ("self_attention.linear_kv_down_proj.weight",
                                 "kv_a_proj_with_mqa.weight", self._kv_rows)):
            if name == ours:
                k = A + key
                shard = 0 if ours != "self_attention.linear_kv_down_proj.weight" else None
                return ([k], lambda g, k=k, rows=rows, shard=shard: (
                    _slice(rows(g(k)), 0, tp, r) if shard == 0 else rows(g(k))),
                    lambda v, k=k, rows=rows: {k: rows(v, inverse=True)})
        if name in ("mlp.experts.fc1_weight", "mlp.experts.fc2_weight"):
            experts = module_of("mlp.experts")
            ids = range(experts.local_expert_offset,
                        experts.local_expert_offset + experts.num_local_experts)
            if name == "mlp.experts.fc1_weight":
                keys = [f"{M}experts.{e}.{p}_proj.weight" for e in ids for p in ("gate", "up")]
                return (keys, lambda g: torch.stack([torch.cat([g(f"{M}experts.{e}.gate_proj.weight"),
                                                                g(f"{M}experts.{e}.up_proj.weight")])
                                                     for e in ids]),
                        lambda v: {k: t for i, e in enumerate(ids) for k, t in (
                            (f"{M}experts.{e}.gate_proj.weight", v[i, : v.shape[1] // 2]),
                            (f"{M}experts.{e}.up_proj.weight", v[i, v.shape[1] // 2:]))})
            keys = [f"{M}experts.{e}.down_proj.weight" for e in ids]
            return (keys, lambda g: torch.stack([g(k) for k in keys]),
                    lambda v: {k: v[i] for i, k in enumerate(keys)})
        raise KeyError(f"no HF name for layer parameter {name!r}")

    def rules(self) -> Iterator[Tuple[str, torch.Tensor, List[str], Callable, Callable]]:
        """(our name, our tensor, HF keys, load, save) for every parameter and persistent buffer."""
        m, c = self.model, self.config
        tp, r = self.tp, self.tp_rank
        state = m.state_dict(keep_vars=True)
        modules = dict(m.named_modules())
        for name, tensor in state.items():
            if name.endswith("_extra_state"):
                continue
            if name == "embedding.word_embeddings.weight":
                k = "model.embed_tokens.weight"
                yield name, tensor, [k], (lambda g, k=k: _slice(g(k), 0, tp, r)), (lambda v, k=k: {k: v})
            elif name == "output_layer.weight":
                k = "lm_head.weight"
                yield name, tensor, [k], (lambda g, k=k: _slice(g(k), 0, tp, r)), (lambda v, k=k: {k: v})
            elif name == "decoder.final_layernorm.weight":
                k = "model.norm.weight"
                yield name, tensor, [k], (lambda g, k=k: g(k)), (lambda v, k=k: {k: v})
            elif name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers."):].split(".", 1)
                base = f"decoder.layers.{local}"
                number = modules[base].layer_number
                prefix = f"model.layers.{number - 1}"
                keys, load, save = self.layer(prefix, rest,
                                              lambda sub, base=base: modules[f"{base}.{sub}"])
                yield name, tensor, keys, load, save
            elif name.startswith("mtp.layers."):
                depth, rest = name[len("mtp.layers."):].split(".", 1)
                prefix = f"model.layers.{c.num_layers + int(depth)}"
                base = f"mtp.layers.{depth}"
                direct = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                          "final_layernorm.weight": "shared_head.norm.weight"}
                if rest in direct:
                    k = f"{prefix}.{direct[rest]}"
                    yield name, tensor, [k], (lambda g, k=k: g(k)), (lambda v, k=k: {k: v})
                elif rest == "eh_proj.weight":
                    k = f"{prefix}.eh_proj.weight"
                    yield name, tensor, [k], (lambda g, k=k: _slice(g(k), 0, tp, r)), \
                        (lambda v, k=k: {k: v})
                elif rest.startswith("transformer_layer."):
                    sub = rest[len("transformer_layer."):]
                    keys, load, save = self.layer(
                        prefix, sub, lambda s, base=base: modules[f"{base}.transformer_layer.{s}"])
                    yield name, tensor, keys, load, save
                else:
                    raise KeyError(f"no HF name for {name}")
            else:
                raise KeyError(f"no HF name for {name}")


# -- load ----------------------------------------------------------------------------------------
@torch.no_grad()
def load_hf(model, path: str, strict: bool = True) -> Dict[str, str]:
    """Fill `model` (any TP/PP/EP slice) from the HF checkpoint at `path`. Returns {our name: HF
    key(s)}. With `strict`, an unsharded model must consume every tensor of the checkpoint
    (MTP copies of the embedding and head are checked against the shared ones instead)."""
    reader = HFReader(path)
    hf_cfg = _read_json(os.path.join(path, "config.json")) if os.path.exists(
        os.path.join(path, "config.json")) else {}
    rules = _Rules(model, interleaved=hf_cfg.get("rope_interleave", True))
    loaded = {}

    def get(key):
        return reader.get(key, dtype=torch.float32)

    for name, tensor, keys, load, _ in rules.rules():
        missing = [k for k in keys if k not in reader]
        if missing:
            raise KeyError(f"{missing[0]} (for {name}) is not in the checkpoint {path} "
                           f"({INDEX} lists {len(reader.where)} tensors)")
        value = load(get)
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{keys[0]} in {reader.file_of(keys[0])} gives shape "
                             f"{tuple(value.shape)} for {name}, which needs {tuple(tensor.shape)}: "
                             "the checkpoint does not match the model's config/parallel layout")
        tensor.copy_(value.to(tensor.dtype))
        loaded[name] = ",".join(keys)
    c = model.config
    for depth in range(c.mtp_num_layers or 0):  # DeepSeek stores copies of the shared tensors
        prefix = f"model.layers.{c.num_layers + depth}"
        for copy_key, shared_key in ((f"{prefix}.embed_tokens.weight", "model.embed_tokens.weight"),
                                     (f"{prefix}.shared_head.head.weight", "lm_head.weight")):
            if copy_key in reader and shared_key in reader:
                if not torch.equal(get(copy_key), get(shared_key)):
                    raise ValueError(f"{copy_key} in {reader.file_of(copy_key)} differs from "
                                     f"{shared_key}: megatron-dsv3 shares the MTP embedding and "
                                     "head with the main model")
    sharded = rules.tp > 1 or _is_partial(model)
    if strict and not sharded:
        unused = sorted(k for k in reader.where if k not in reader.used
                        and not k.endswith("rotary_emb.inv_freq"))
        if unused:
            raise ValueError(f"{len(unused)} tensors of {path} were not loaded, e.g. {unused[:3]} "
                             f"(in {reader.file_of(unused[0])}): the model has no place for them")
    reader.close()
    return loaded


def _is_partial(model) -> bool:
    """True when this model holds only part of the layers or experts (PP or EP)."""
    from megatron_dsv3.moe.experts import GroupedExperts

    c = model.config
    numbers = [l.layer_number for l in model.decoder.layers]
    if numbers != list(range(1, c.num_layers + 1)) or not (model.pre_process and model.post_process):
        return True
    return any(m.num_local_experts != c.num_moe_experts for m in model.modules()
               if isinstance(m, GroupedExperts))


# -- save ----------------------------------------------------------------------------------------
def _quantizable(key: str) -> bool:
    """DeepSeek quantises the linear weights inside layers; not embeddings, head, norms, gate."""
    if not key.startswith("model.layers.") or not key.endswith(".weight"):
        return False
    return any(p in key for p in ("_proj.weight",)) and "layernorm" not in key \
        and not key.endswith("eh_proj.weight")


@torch.no_grad()
def save_hf(model, path: str, fp8: bool = True, shard_bytes: int = 4 << 30,
            dtype: torch.dtype = torch.bfloat16, progress: Optional[Callable[[str], None]] = None):
    """Write `model` (one rank holding all of it) as a DeepSeek-V3 HF checkpoint at `path`.

    FP8: the linear weights of the layers as float8_e4m3fn + weight_scale_inv (128x128 blocks),
    config.json with quantization_config; everything else in `dtype`. Shards are written as they
    fill; the directory appears at `path` only once complete.
    """
    from safetensors.torch import save_file

    if _tp(model)[0] > 1 or _is_partial(model):
        raise ValueError("save_hf needs the whole model on this rank (tensor/pipeline/expert "
                         "parallel size 1); convert a distributed checkpoint with "
                         "`python -m megatron_dsv3.checkpoint convert`")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map, pending, pending_bytes, files = {}, {}, 0, []

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(pending, os.path.join(tmp, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in pending})
        files.append(name)
        if progress:
            progress(f"wrote {name} ({pending_bytes / 2**20:.1f} MiB)")
        pending, pending_bytes = {}, 0

    def put(key, t):
        nonlocal pending_bytes
        pending[key] = t.contiguous()
        pending_bytes += t.numel() * t.element_size()
        if pending_bytes >= shard_bytes:
            flush()

    rules = _Rules(model)
    c = model.config
    for name, tensor, keys, _, save in rules.rules():
        for key, full in save(tensor.detach().float().cpu()).items():
            if "e_score_correction_bias" in key or key.endswith("mlp.gate.weight"):
                put(key, full.float())  # the router stays in float32
            elif fp8 and _quantizable(key):
                q, scale = quantize_128x128(full)
                put(key, q)
                put(key[: -len("weight")] + "weight_scale_inv", scale)
            else:
                put(key, full.to(dtype))
    for depth in range(c.mtp_num_layers or 0):
        prefix = f"model.layers.{c.num_layers + depth}"
        put(f"{prefix}.embed_tokens.weight", model.embedding.word_embeddings.weight.to(dtype))
        put(f"{prefix}.shared_head.head.weight", model.output_layer.weight.to(dtype))
    flush()
    total = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
    with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg = hf_config_dict(c)
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return weight_map
