"""HF checkpoints: our model loaded from a transformers DeepseekV3ForCausalLM checkpoint gives the
same logits; FP8 copies load as their dequantised weights; export/re-import is the identity."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megatron_dsv3.checkpoint.hf import INDEX, config_from_hf, load_hf, save_hf  # noqa: E402
from megatron_dsv3.fp8.quant import dequantize_128x128, quantize_128x128  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8,
            n_shared_experts=1, n_group=2, topk_group=1, num_experts_per_tok=2,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
            num_nextn_predict_layers=0, max_position_embeddings=256, tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
        "mscale_all_dim": 1.0}
VARIANTS = {
    "q_lora+groups+yarn+1dense": dict(rope_parameters=YARN),
    "no_q_lora+1group+rope+0dense": dict(q_lora_rank=None, n_group=1, topk_group=1,
                                         first_k_dense_replace=0,
                                         rope_parameters={"rope_type": "default",
                                                          "rope_theta": 10000.0}),
    "2dense+4groups+half_split_rope": dict(first_k_dense_replace=2, n_group=4, topk_group=2,
                                           num_experts_per_tok=3, rope_interleave=False,
                                           rope_parameters=dict(YARN, mscale=0.8,
                                                                mscale_all_dim=0.5)),
}


def hf_checkpoint(tmp_path, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**dict(BASE, **overrides))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # every tensor random (HF leaves some at zero or uninitialised)
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))
    path = str(tmp_path / "hf")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def ours_from(path, single_rank_world=None, **overrides):
    from megatron_dsv3.model import build_model

    model = build_model(config_from_hf(path, **overrides))
    load_hf(model, path)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_transformers(tmp_path, single_rank_world, variant):
    hf, path = hf_checkpoint(tmp_path, **VARIANTS[variant])
    ours = ours_from(path)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(logits(ours, ids), ref, rtol=1e-5, atol=1e-5)


def fp8_copy(src, dst):
    """Quantise every linear weight of the layers to E4M3 with 128x128 weight_scale_inv."""
    os.makedirs(dst)
    out, deq = {}, {}
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if k.startswith("model.layers.") and k.endswith("_proj.weight"):
                q, s = quantize_128x128(t)
                out[k], out[k[:-6] + "weight_scale_inv"] = q, s
                deq[k] = dequantize_128x128(q, s)
            else:
                out[k] = t
    save_file(out, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                  "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return deq


def test_fp8_checkpoint_loads_as_its_dequantised_weights(tmp_path, single_rank_world):
    hf, path = hf_checkpoint(tmp_path, rope_parameters=YARN)
    deq = fp8_copy(path, str(tmp_path / "fp8"))
    ours = ours_from(str(tmp_path / "fp8"))
    state = hf.state_dict()
    with torch.no_grad():  # the HF model with the dequantised weights is the reference
        for k, v in deq.items():
            if k in state:
                state[k].copy_(v)
            else:  # transformers fuses the experts of a layer: gate_up_proj [E, 2F, H]
                layer, rest = k.split(".mlp.experts.")
                e, proj = int(rest.split(".")[0]), rest.split(".")[1]
                if proj == "down_proj":
                    state[f"{layer}.mlp.experts.down_proj"][e].copy_(v)
                else:
                    f = v.shape[0]
                    off = 0 if proj == "gate_proj" else f
                    state[f"{layer}.mlp.experts.gate_up_proj"][e, off:off + f].copy_(v)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(logits(ours, ids), ref, rtol=1e-5, atol=1e-5)


def test_export_then_import_is_the_identity(tmp_path, single_rank_world):
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny"))  # with MTP
    with torch.no_grad():
        for r in model.modules():
            if hasattr(r, "expert_bias") and r.expert_bias is not None:
                r.expert_bias.copy_(torch.randn_like(r.expert_bias))
    save_hf(model, str(tmp_path / "bf"), fp8=False, dtype=torch.float32, shard_bytes=200_000)
    assert len(json.load(open(tmp_path / "bf" / INDEX))["weight_map"]) > 50
    assert len([f for f in os.listdir(tmp_path / "bf") if f.endswith(".safetensors")]) > 1
    again = build_model(config_from_hf(str(tmp_path / "bf")))
    load_hf(again, str(tmp_path / "bf"))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), n
    # FP8 export: re-import gives the dequantised weights
    save_hf(model, str(tmp_path / "f8"), fp8=True)
    cfg = json.load(open(tmp_path / "f8" / "config.json"))
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    third = build_model(config_from_hf(str(tmp_path / "f8")))
    load_hf(third, str(tmp_path / "f8"))
    w = model.decoder.layers[1].self_attention.linear_kv_up_proj.weight
    got = third.decoder.layers[1].self_attention.linear_kv_up_proj.weight
    torch.testing.assert_close(got, dequantize_128x128(*quantize_128x128(w)))
    assert torch.equal(third.decoder.layers[1].mlp.router.expert_bias,
                       model.decoder.layers[1].mlp.router.expert_bias)


def test_bad_checkpoints_name_the_tensor_and_file(tmp_path, single_rank_world):
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny"))
    save_hf(model, str(tmp_path / "ck"), fp8=True, shard_bytes=100_000)
    index = json.load(open(tmp_path / "ck" / INDEX))["weight_map"]
    # a missing shard
    victim = index["model.layers.1.self_attn.o_proj.weight"]
    os.rename(tmp_path / "ck" / victim, tmp_path / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        load_hf(build_model(get_config("deepseek-v3-tiny")), str(tmp_path / "ck"))
    os.rename(tmp_path / victim, tmp_path / "ck" / victim)
    # a config the model cannot hold: wrong hidden size
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        load_hf(build_model(get_config("deepseek-v3-tiny", hidden_size=48, ffn_hidden_size=96)),
                str(tmp_path / "ck"))
    # a scale_inv of the wrong block shape
    key = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    shard = tmp_path / "ck" / index[key]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = torch.ones(3, 3)
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match="kv_b_proj.weight_scale_inv"):
        load_hf(build_model(get_config("deepseek-v3-tiny")), str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        config_from_hf(dict(BASE, tie_word_embeddings=True))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, single_rank_world, monkeypatch):
    from megatron_dsv3.checkpoint import hf as hf_mod
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import build_model

    model = build_model(get_config("deepseek-v3-tiny"))
    save_hf(model, str(tmp_path / "ck"), fp8=False, shard_bytes=100_000)
    before = sorted(os.listdir(tmp_path / "ck"))
    calls = []

    def dying(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("node lost")
        from safetensors.torch import save_file as real
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", dying)
    with pytest.raises(OSError):
        hf_mod.save_hf(model, str(tmp_path / "ck"), fp8=False, shard_bytes=100_000)
    assert sorted(os.listdir(tmp_path / "ck")) == before  # untouched, still loadable
    load_hf(build_model(get_config("deepseek-v3-tiny")), str(tmp_path / "ck"))
