"""Test checkpoints made with HF transformers and independent references computed from them.

Nothing here uses megatron_dsv3.checkpoint: the references (FP8 dequantisation, MTP forward,
expert fusion) are written out from the formulas so that the tests compare against them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Dict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def hf_config(**overrides):
    from transformers import DeepseekV3Config

    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=12,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                  max_position_embeddings=128, rope_interleave=True, num_nextn_predict_layers=0,
                  rope_parameters=dict(YARN), routed_scaling_factor=2.5)
    fields.update(overrides)
    config = DeepseekV3Config(**fields)
    config._attn_implementation = "eager"
    return config


def make_hf_checkpoint(path: str, seed: int = 0, **overrides):
    """DeepseekV3ForCausalLM with random weights, random router biases and norm weights, saved in
    float32 by transformers; returns the model (eval mode)."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint directory, as stored."""
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def rewrite(path: str, new: Dict[str, torch.Tensor], config_updates=None) -> None:
    """Replace the checkpoint's tensors by `new` (one model.safetensors + index); a changed
    checkpoint of ours drops its manifest, as a user changing it on purpose would."""
    for file in os.listdir(path):
        if file.endswith((".safetensors", ".index.json", "checkpoint_manifest.json")):
            os.remove(os.path.join(path, file))
    save_file({k: v.contiguous() for k, v in new.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: "model.safetensors" for k in new}}, f)
    if config_updates is not None:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config.update(config_updates)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)


# -- MTP ---------------------------------------------------------------------------------------
def add_mtp_layers(path: str, hf_model, depth: int, seed: int = 1) -> None:
    """Append DeepSeek's MTP modules model.layers.{L + k} (random enorm, hnorm, eh_proj, a full
    MoE decoder layer, shared_head.norm, and the embedding/head copies) to the checkpoint."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    torch.manual_seed(seed)
    config = hf_model.config
    L, h = config.num_hidden_layers, config.hidden_size
    new = tensors(path)
    for k in range(depth):
        p = f"model.layers.{L + k}."
        layer = DeepseekV3DecoderLayer(config, layer_idx=max(L + k, config.first_k_dense_replace))
        with torch.no_grad():
            for name, t in layer.named_parameters():
                t.normal_(0, 0.1) if "norm" not in name else t.copy_(1 + 0.2 * torch.randn_like(t))
            layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(config.n_routed_experts))
        new.update({p + n: t for n, t in unfuse_experts(layer.state_dict()).items()})
        new.update({p + "enorm.weight": 1 + 0.2 * torch.randn(h),
                    p + "hnorm.weight": 1 + 0.2 * torch.randn(h),
                    p + "eh_proj.weight": 0.1 * torch.randn(h, 2 * h),
                    p + "shared_head.norm.weight": 1 + 0.2 * torch.randn(h),
                    p + "embed_tokens.weight": new["model.embed_tokens.weight"].clone(),
                    p + "shared_head.head.weight": new["lm_head.weight"].clone()})
    rewrite(path, new, {"num_nextn_predict_layers": depth})


def unfuse_experts(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' fused expert parameters -> DeepSeek's per-expert checkpoint names."""
    out = {}
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):
            base, half = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :half].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, half:].clone()
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def fuse_experts(state: Dict[str, torch.Tensor], num_experts: int) -> Dict[str, torch.Tensor]:
    """DeepSeek's per-expert names -> transformers' fused parameters (for load_state_dict)."""
    out = {k: v for k, v in state.items() if ".experts." not in k}
    bases = {k.split(".experts.")[0] for k in state if ".experts." in k}
    for base in bases:
        out[f"{base}.experts.gate_up_proj"] = torch.stack([
            torch.cat([state[f"{base}.experts.{e}.gate_proj.weight"],
                       state[f"{base}.experts.{e}.up_proj.weight"]]) for e in range(num_experts)])
        out[f"{base}.experts.down_proj"] = torch.stack(
            [state[f"{base}.experts.{e}.down_proj.weight"] for e in range(num_experts)])
    return out


def rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def roll_left(ids):
    out = torch.roll(ids, -1, dims=-1)
    out[..., -1] = 0
    return out


@torch.no_grad()
def mtp_reference_logits(hf_model, path: str, ids: torch.Tensor, depth: int):
    """DeepSeek-V3's MTP forward written out from the checkpoint tensors, one depth after another:
    h'_i = eh_proj [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)], h^k = shared_head.norm(Layer_k(h')),
    logits = head(h^k); h^0 is the main model's final (normed) hidden state."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    config = hf_model.config
    L, eps = config.num_hidden_layers, config.rms_norm_eps
    state = tensors(path)
    out = hf_model.model(input_ids=ids)
    hidden = out.last_hidden_state
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    cos_sin = hf_model.model.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    logits = []
    for k in range(depth):
        p = f"model.layers.{L + k}."
        ids = roll_left(ids)
        emb = torch.nn.functional.embedding(ids, state["model.embed_tokens.weight"])
        x = torch.cat([rms_norm(emb, state[p + "enorm.weight"], eps),
                       rms_norm(hidden, state[p + "hnorm.weight"], eps)], dim=-1)
        x = x @ state[p + "eh_proj.weight"].t()
        layer = DeepseekV3DecoderLayer(config, layer_idx=max(L + k, config.first_k_dense_replace))
        sub = {n[len(p):]: t for n, t in state.items() if n.startswith(p)}
        layer_state = fuse_experts({n: t for n, t in sub.items() if not n.startswith(
            ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens"))}, config.n_routed_experts)
        layer.load_state_dict(layer_state, strict=True)
        layer.eval()
        x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        hidden = rms_norm(x, state[p + "shared_head.norm.weight"], eps)
        logits.append(hidden @ state["lm_head.weight"].t())
    return logits


# -- FP8 ---------------------------------------------------------------------------------------
FP8_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj")


def is_quantised(name: str) -> bool:
    """The linear weights DeepSeek ships in FP8 (not eh_proj, gate, norms, embedding, head)."""
    return name.endswith(".weight") and name.split(".")[-2] in FP8_LINEARS


def naive_dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """block (i // 128, j // 128) of q times its scale_inv, element by element."""
    rows = torch.arange(q.shape[0]) // 128
    cols = torch.arange(q.shape[1]) // 128
    return q.float() * scale_inv[rows[:, None], cols[None, :]]


def make_fp8_copy(src: str, dst: str, scale_fmt=None) -> Dict[str, torch.Tensor]:
    """DeepSeek's FP8 layout of `src` in `dst` (scale_fmt 'ue8m0': power-of-2 block scales, as
    later DeepSeek-V3 releases); returns the dequantised weights by name."""
    from megatron_dsv3.fp8.quant import quantize_128x128

    shutil.copytree(src, dst)
    out, dequantised = {}, {}
    for name, t in tensors(src).items():
        if is_quantised(name):
            q, s = quantize_128x128(t, pow2_scales=scale_fmt == "ue8m0")
            assert tuple(s.shape) == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            out[name], out[name + "_scale_inv"] = q, s
            dequantised[name] = naive_dequantize(q, s)
        else:
            out[name] = t
            dequantised[name] = t
    quantization = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}
    if scale_fmt is not None:
        quantization["scale_fmt"] = scale_fmt
    rewrite(dst, out, {"quantization_config": quantization})
    return dequantised


def make_dequantised_copy(src: str, dst: str, dequantised: Dict[str, torch.Tensor]) -> None:
    """`src` (the original, unquantised checkpoint) with its weights replaced by `dequantised`."""
    shutil.copytree(src, dst)
    rewrite(dst, dequantised)
